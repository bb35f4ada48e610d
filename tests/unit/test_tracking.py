"""System metrics reach the MLflow run even when the run is shorter than one sampling interval."""
from mlflow.tracking import MlflowClient

from hmtrain.train.tracking import start_system_metrics, stop_system_metrics


def test_a_run_shorter_than_one_interval_still_logs_one_sample(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("system-metrics"))
    monitor = start_system_metrics(run.info.run_id, uri, interval_s=3600.0, resume=False)
    assert monitor is not None
    stop_system_metrics(monitor)  # long before the first interval ends
    metrics = client.get_run(run.info.run_id).data.metrics
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)


def test_other_local_ranks_start_no_monitor(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert start_system_metrics("some-run", f"sqlite:///{tmp_path / 'm.db'}", 1.0, resume=False) is None


def test_the_default_store_is_shared_beside_the_run_directories_unless_a_run_has_its_own(tmp_path, monkeypatch):
    from hmtrain.train.mlflow_logger import default_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_store(tmp_path / "runs" / "mem") == (f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}",
                                                        tmp_path / "runs" / "mlartifacts")
    older = tmp_path / "runs" / "old"
    older.mkdir(parents=True)
    (older / "mlflow.db").write_bytes(b"")  # a run directory from before keeps its own store on resume
    assert default_store(older) == (f"sqlite:///{older / 'mlflow.db'}", older / "mlartifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_store(older)[0] == "http://mlflow:5000"
