"""A training run killed after a checkpoint resumes to exactly the uninterrupted loss curve."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.dist.conftest import torchrun
from tests.e2e.conftest import run_cli

STEPS = ["train.pretrain_steps=10", "train.memory_steps=14", "train.checkpoint_every=5"]


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def mlflow_losses(client, run_id):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


def test_killed_run_resumes_exactly(prepared, tmp_path):
    overrides = [*prepared["overrides"], *STEPS, f"logging.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("train", "--config", "tiny", *overrides, f"train.run_dir={straight}", cwd=tmp_path)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "hmtrain.cli", "train", "--config", "tiny", *overrides,
                             f"train.run_dir={killed}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step_00000015" / "trainer.json"  # inside the memory phase
    deadline = time.monotonic() + 240
    logged = killed / "metrics.jsonl"
    # kill a couple of steps past the checkpoint, so the killed run logged steps the resumed run redoes
    while proc.poll() is None and time.monotonic() < deadline:
        if target.exists() and logged.exists() and len(logged.read_text().splitlines()) >= 17:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "training finished before it could be killed"
    assert target.exists()
    assert not (killed / "checkpoints" / "step_00000024").exists()

    run_cli("train", "--config", "tiny", *overrides, f"train.run_dir={killed}", "--resume", cwd=tmp_path)
    expected = losses(straight)
    assert [s for s, _ in expected] == list(range(1, 25))
    assert losses(killed) == expected  # bit-exact on CPU: same data order, RNG, optimizer and bank state

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    by_dir = {r.data.params["train.run_dir"]: r for r in runs}
    assert len(runs) == 2, "--resume must continue the killed run, not start a new one"
    assert by_dir[str(killed)].info.status == "FINISHED"
    # MLflow holds what metrics.jsonl holds, step for step: no step logged twice across the kill
    assert mlflow_losses(client, by_dir[str(killed)].info.run_id) == losses(killed)


def test_broken_tracking_does_not_stop_training_and_runs_are_not_overwritten(prepared, tmp_path):
    overrides = [*prepared["overrides"], "train.pretrain_steps=2", "train.memory_steps=0",
                 "logging.tracking_uri=bogus-scheme://nowhere", f"train.run_dir={tmp_path / 'run'}"]
    proc = run_cli("train", "--config", "tiny", *overrides, cwd=tmp_path)
    assert "MLflow start failed" in proc.stderr and "training goes on" in proc.stderr
    assert len(losses(tmp_path / "run")) == 2
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    proc = run_cli("train", "--config", "tiny", *overrides, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_sigterm_checkpoints_the_current_step_and_resumes(prepared, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*prepared["overrides"], "train.pretrain_steps=30", "train.memory_steps=30",
                 "train.checkpoint_every=1000", "logging.mlflow=false", f"train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "hmtrain.cli", "train", "--config", "tiny", *overrides],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr
    stopped_at = len(losses(run_dir))
    assert 3 <= stopped_at < 60
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "trainer.json").exists()
    run_cli("train", "--config", "tiny", *overrides, "--resume", cwd=tmp_path)
    assert [s for s, _ in losses(run_dir)] == list(range(1, 61))


def test_kill_before_the_first_checkpoint_keeps_one_mlflow_run(prepared, tmp_path):
    run_dir, tracking = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*prepared["overrides"], "train.pretrain_steps=12", "train.memory_steps=0",
                 "train.checkpoint_every=1000", f"logging.tracking_uri={tracking}", f"train.run_dir={run_dir}"]
    kill_after(overrides, run_dir, tmp_path, lines=3)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())

    run_cli("train", "--config", "tiny", *overrides, "--resume", cwd=tmp_path)  # a requeued job passes --resume
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    assert len(runs) == 1, "the restart must continue the run directory's MLflow run"
    assert runs[0].info.status == "FINISHED"
    assert [s for s, _ in losses(run_dir)] == list(range(1, 13))
    assert mlflow_losses(client, runs[0].info.run_id) == losses(run_dir)


def kill_after(overrides, run_dir, cwd, lines):
    """Start `train` and SIGKILL it once metrics.jsonl holds `lines` steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "hmtrain.cli", "train", "--config", "tiny", *overrides],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "training finished before it could be killed"


@pytest.mark.multiprocess
def test_restart_on_another_world_size_before_the_first_checkpoint_continues_the_mlflow_run(prepared, tmp_path):
    run_dir, tracking = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*prepared["overrides"], "train.pretrain_steps=12", "train.memory_steps=0", "train.micro_batch_size=2",
                 "train.checkpoint_every=1000", f"logging.tracking_uri={tracking}", f"train.run_dir={run_dir}",
                 "logging.system_metrics_interval_s=0.2"]  # the killed process leaves system metrics behind
    kill_after(overrides, run_dir, tmp_path, lines=3)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())

    torchrun(2, ["-m", "hmtrain.cli", "train", "--config", "tiny", *overrides, "--resume"], cwd=tmp_path)
    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    assert len(runs) == 1, "the restart on 2 ranks must continue the run directory's MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert mlflow_losses(client, run.info.run_id) == losses(run_dir)
    assert [s for s, _ in losses(run_dir)] == list(range(1, 13))
    # MLflow never changes a param: the first value stays, the restart's is a tag
    assert run.data.params["parallel.world_size"] == "1"
    assert run.data.tags["latest.parallel.world_size"] == "2"


def test_fallback_past_a_checkpoint_mlflow_has_seen_logs_no_step_twice(prepared, tmp_path):
    run_dir, tracking = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [*prepared["overrides"], "train.pretrain_steps=4", "train.memory_steps=4", "train.checkpoint_every=4",
                 f"logging.tracking_uri={tracking}", f"train.run_dir={run_dir}"]
    run_cli("train", "--config", "tiny", *overrides, cwd=tmp_path)
    straight = losses(run_dir)
    last = run_dir / "checkpoints" / "step_00000008" / "__0_0.distcp"
    last.write_bytes(last.read_bytes()[:300])  # MLflow already holds steps 5-8, which the fallback redoes

    run_cli("train", "--config", "tiny", *overrides, "--resume", "--fallback", cwd=tmp_path)
    assert losses(run_dir) == straight  # redone from step 4, bit for bit
    client = MlflowClient(tracking_uri=tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    assert mlflow_losses(client, run.info.run_id) == losses(run_dir)


def test_resume_on_an_empty_directory_is_refused_and_leaves_it_empty(prepared, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = run_cli("train", "--config", "tiny", *prepared["overrides"], "train.pretrain_steps=1",
                   "train.memory_steps=0", "logging.mlflow=false", f"train.run_dir={run_dir}", "--resume",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr, proc.stderr
    assert list(run_dir.iterdir()) == []
