"""`logging`: MLflow tracking of a run's params, metrics and system metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LoggingConfig:
    # track the run in MLflow (metrics.jsonl is written either way)
    mlflow: bool = True
    # null: $MLFLOW_TRACKING_URI, else a local store inside the run directory
    tracking_uri: Optional[str] = None
    # the MLflow experiment's name
    experiment: str = "hmtrain"
    # the MLflow run's name (null: the run directory's name)
    run_name: Optional[str] = None
    # the MLflow run this run is a child of (`hmtrain study` sets it: one child per arm x seed); null: none
    parent_run_id: Optional[str] = None
    # CPU, memory, disk and GPU utilisation from the first rank of every node (MLflow system metrics)
    system_metrics: bool = True
    # seconds between MLflow system-metric samples
    system_metrics_interval_s: float = 10.0
