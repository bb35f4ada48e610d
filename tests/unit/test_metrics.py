"""metrics.jsonl survives a torn last line; MLflow holds exactly the durable steps, once each."""
import getpass
import json
import logging
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import hmtrain
from hmtrain.train import mlflow_logger as mlflow_mod
from hmtrain.train.metrics import JsonlLogger, read_metrics
from hmtrain.train.mlflow_logger import RUN_ID_FILE, MLflowLogger


@pytest.fixture(autouse=True)
def restore_mlflow_env(monkeypatch):
    """MLflowLogger sets MLflow's HTTP settings in os.environ; keep them out of later tests."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "x")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(name)


def write_lines(path, *lines, newline_at_end=True):
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))


def test_torn_last_line_is_dropped_on_read_and_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, '{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}', '{"step": 3, "lo',
                newline_at_end=False)
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "torn last line 3" in caplog.text
    logger = JsonlLogger(path, resume_step=2)
    logger.log({"loss": 1.0}, 3)
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith("\n")


def test_invalid_line_elsewhere_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, '{"step": 1, "loss": 2.0}', '{"step": 2, "lo', '{"step": 3, "loss": 1.0}')
    with pytest.raises(ValueError) as exc_info:
        read_metrics(path)
    assert str(path) in str(exc_info.value) and "line 2" in str(exc_info.value)
    with pytest.raises(ValueError):
        JsonlLogger(path, resume_step=3)
    assert path.read_text().count("\n") == 3  # untouched


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def make_logger(tmp_path, **kwargs) -> MLflowLogger:
    return MLflowLogger(tracking_uri=sqlite_uri(tmp_path), experiment="t", run_name="r", run_dir=tmp_path / "run",
                        artifact_dir=tmp_path / "art", **kwargs)


def history(tmp_path, run_id, key="loss"):
    return [(m.step, m.value) for m in MlflowClient(sqlite_uri(tmp_path)).get_metric_history(run_id, key)]


def test_mlflow_gets_durable_steps_once_across_a_crash_and_resume(tmp_path):
    first = make_logger(tmp_path, params={"a": 1})
    for step in range(1, 6):
        first.log({"loss": float(step)}, step)
    first.flush(3)  # a checkpoint at step 3
    first.wait()
    # killed here: steps 4, 5 were never durable, and the resumed run redoes them
    assert history(tmp_path, first.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert json.loads((tmp_path / "run" / RUN_ID_FILE).read_text())["run_id"] == first.run_id

    resumed = make_logger(tmp_path, run_id=first.run_id, resume=True)
    assert resumed.run_id == first.run_id and not resumed.is_new
    # metrics.jsonl after the resume trim holds 1..3, plus 4 that a crash kept from MLflow
    resumed.backfill([{"step": s, "loss": float(s)} for s in range(1, 5)])
    for step in range(5, 8):
        resumed.log({"loss": 10.0 + step}, step)
    resumed.flush(7)
    resumed.close()
    assert history(tmp_path, first.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0),
                                               (7, 17.0)]
    assert MlflowClient(sqlite_uri(tmp_path)).get_run(first.run_id).info.status == "FINISHED"


def test_restart_before_the_first_checkpoint_reuses_the_run(tmp_path):
    first = make_logger(tmp_path, params={"a": 1})
    first.log({"loss": 1.0}, 1)  # killed before any checkpoint: nothing durable
    again = make_logger(tmp_path, params={"a": 1})
    assert again.run_id == first.run_id and again.is_new
    client = MlflowClient(sqlite_uri(tmp_path))
    assert len(client.search_runs([client.get_experiment_by_name("t").experiment_id])) == 1
    changed = make_logger(tmp_path, params={"a": 2})  # other params: a new run, not a param clash
    assert changed.run_id != first.run_id


def test_failed_calls_are_retried_then_skipped_without_switching_tracking_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(mlflow_mod.time, "sleep", lambda s: None)
    logger = make_logger(tmp_path)
    calls = []

    def broken_upload(*args, **kwargs):
        calls.append(args)
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(logger._client, "log_artifact", broken_upload)
    with caplog.at_level(logging.WARNING):
        logger.log_artifact(tmp_path / "x.txt")
        logger.wait()  # uploads run on the sender thread
    assert len(calls) == mlflow_mod.ATTEMPTS and "skipped, tracking goes on" in caplog.text
    assert logger.enabled

    real_log_batch = logger._client.log_batch
    failures = iter([True, True, True])  # the first flush fails every try; its steps stay buffered

    def flaky_log_batch(*args, **kwargs):
        if next(failures, False):
            raise OSError("server hiccup")
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(logger._client, "log_batch", flaky_log_batch)
    logger.log({"loss": 1.0}, 1)
    logger.flush(1)
    logger.wait()
    assert history(tmp_path, logger.run_id) == []
    logger.log({"loss": 2.0}, 2)
    logger.flush(2)
    logger.wait()
    assert history(tmp_path, logger.run_id) == [(1, 1.0), (2, 2.0)]


@pytest.mark.timeout(60)  # before: MLflow's own retries held start-up for ~4 minutes
def test_unreachable_server_gives_up_quickly(tmp_path, monkeypatch, caplog):
    sleeps = []
    monkeypatch.setattr(mlflow_mod.time, "sleep", sleeps.append)
    with socket.socket() as sock:  # a localhost port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with caplog.at_level(logging.WARNING):
        logger = MLflowLogger(tracking_uri=f"http://127.0.0.1:{port}", experiment="t", run_name="r",
                              run_dir=tmp_path / "run")
    assert not logger.enabled
    assert "MLflow start failed" in caplog.text and f"at most {mlflow_mod.START_TIMEOUT_S} s" in caplog.text
    assert sum(sleeps) <= mlflow_mod.START_TIMEOUT_S
    logger.log({"loss": 1.0}, 1)
    logger.flush(1)
    logger.close()


def test_each_step_keeps_the_time_it_was_logged_though_sent_at_the_checkpoint(tmp_path, monkeypatch):
    logger = make_logger(tmp_path)
    now = [0.0]
    monkeypatch.setattr(mlflow_mod.time, "time", lambda: now[0])
    for step in (1, 2, 3):
        now[0] = 1_000.0 + step  # the step runs
        logger.log({"loss": 1.0 / step}, step)
    now[0] = 2_000.0
    logger.flush(3)  # the checkpoint at step 3 sends all three at one moment
    logger.close()
    points = sorted(MlflowClient(tracking_uri=sqlite_uri(tmp_path)).get_metric_history(logger.run_id, "loss"),
                    key=lambda m: m.step)
    assert [(m.step, m.timestamp) for m in points] == [(1, 1_001_000), (2, 1_002_000), (3, 1_003_000)]


def test_flush_sends_on_another_thread_and_returns_while_the_server_is_slow(tmp_path, monkeypatch):
    import threading

    logger = make_logger(tmp_path)
    real_log_batch, release, senders = logger._client.log_batch, threading.Event(), []

    def slow_log_batch(*args, **kwargs):
        senders.append(threading.current_thread().name)
        assert release.wait(timeout=30), "the training thread never got past flush"
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(logger._client, "log_batch", slow_log_batch)
    logger.log({"loss": 1.0}, 1)
    logger.flush(1)  # the server holds this call until `release`: flush must not wait for it
    logger.log({"loss": 2.0}, 2)  # the training thread goes on logging meanwhile
    logger.flush(2)
    release.set()
    logger.close()
    assert senders and all(name.startswith("hmtrain-mlflow") for name in senders)
    assert sorted(history(tmp_path, logger.run_id)) == [(1, 1.0), (2, 2.0)]
    assert MlflowClient(sqlite_uri(tmp_path)).get_run(logger.run_id).info.status == "FINISHED"


def test_a_new_run_is_tagged_with_user_host_version_and_commit(tmp_path):
    logger = make_logger(tmp_path)
    tags = MlflowClient(tracking_uri=sqlite_uri(tmp_path)).get_run(logger.run_id).data.tags
    assert tags["mlflow.user"] == getpass.getuser() and tags["host"] == socket.gethostname()
    assert tags["hmtrain.version"] == hmtrain.__version__
    if (Path(hmtrain.__file__).resolve().parents[1] / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40
    logger.close()
