"""The run's tracking behind one two-method logger (`log`, `close`): `metrics.jsonl` and MLflow on rank 0
(hmtrain/train/metrics.py, mlflow_logger.py), MLflow system metrics from the first rank of each node.

`Tracker.flush(step)` is called once a checkpoint makes the steps up to it durable: only those reach
MLflow (metrics.py says why). System metrics (CPU, memory, disk, network; GPU with pynvml): rank 0
owns the MLflow run; the other nodes' first ranks log into the same run under their own node id, so
one run shows every machine of the job. Like all tracking, a failure only warns.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from hmtrain.checkpoint.resume import may_change
from hmtrain.config import Config, flatten, to_yaml
from hmtrain.train.metrics import JsonlLogger
from hmtrain.train.mlflow_logger import MLflowLogger, default_store

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, jsonl: Optional[JsonlLogger], mlflow: Optional[MLflowLogger], monitor):
        self.jsonl, self.mlflow, self.monitor = jsonl, mlflow, monitor

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in (self.jsonl, self.mlflow):
            if logger is not None:
                logger.log(metrics, step)

    def flush(self, step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.flush(step)  # MLflow gets a step once a complete checkpoint covers it

    def close(self, status: str = "FINISHED") -> None:
        stop_system_metrics(self.monitor)
        if self.jsonl is not None:
            self.jsonl.close()
        if self.mlflow is not None:
            self.mlflow.close(status=status)


def start_tracking(cfg: Config, *, is_main: bool, control_group, resume: bool, step: int, run_id: Optional[str],
                   params: Callable[[], dict[str, Any]], artifacts: Sequence[Path]) -> Tracker:
    """Open the run's trackers (every rank calls this). `run_id`: the MLflow run a resumed checkpoint
    records; `params()`: numbers logged beside the config; `artifacts`: files logged once with config.yaml."""
    run_dir = Path(cfg.train.run_dir)
    jsonl, mlflow = None, None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # before config.yaml is rewritten: a broken metrics.jsonl stops a resume with nothing changed
        jsonl = JsonlLogger(run_dir / "metrics.jsonl", resume_step=step if resume else None)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if cfg.logging.mlflow:
            uri, artifacts_root = default_store(run_dir)
            mlflow = MLflowLogger(tracking_uri=cfg.logging.tracking_uri or uri,
                                  experiment=cfg.logging.experiment, run_name=cfg.logging.run_name or run_dir.name,
                                  run_id=run_id, artifact_dir=artifacts_root, run_dir=run_dir,
                                  resume=resume, params={**flatten(cfg), **params()},
                                  parent_run_id=cfg.logging.parent_run_id,
                                  may_change=lambda key: key == "parallel.world_size" or may_change(key))
            if resume:
                mlflow.backfill(jsonl.records)  # durable steps an earlier process could not send
            if mlflow.is_new:
                for artifact in (run_dir / "config.yaml", *artifacts):
                    mlflow.log_artifact(artifact)
    monitor = None
    if cfg.logging.mlflow and cfg.logging.system_metrics:
        # every node's first rank logs its machine's metrics into rank 0's run
        shared = [mlflow.run_id if mlflow is not None else run_id, mlflow.tracking_uri if mlflow is not None else None]
        if control_group is not None:
            torch.distributed.broadcast_object_list(shared, src=0, group=control_group)
        monitor = start_system_metrics(shared[0], shared[1], cfg.logging.system_metrics_interval_s, resume)
    return Tracker(jsonl, mlflow, monitor)


def start_system_metrics(run_id: Optional[str], tracking_uri: str, interval_s: float, resume: bool):
    """Start a SystemMetricsMonitor on this node's first rank; returns it (call `.finish()`), or None."""
    if run_id is None or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        node = os.environ.get("GROUP_RANK") or os.environ.get("SLURM_NODEID")
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume,
                                       node_id=f"node{node}-{socket.gethostname()}" if node else None,
                                       tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - tracking never stops training
        log.warning("MLflow system metrics unavailable (%s: %s); training goes on", type(exc).__name__, exc)
        return None


def stop_system_metrics(monitor) -> None:
    if monitor is None:
        return
    try:
        monitor.finish()
        if monitor._logging_step == 0:
            # The monitor publishes after each sampling interval and drops a partial one at shutdown, so a run
            # shorter than one interval would show no system metrics at all: log what one sample sees now.
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow system metrics did not stop cleanly (%s: %s)", type(exc).__name__, exc)
