"""MLflow system metrics (CPU, memory, disk, network; GPU with pynvml) from the first rank of each node.

Rank 0 owns the MLflow run; the other nodes' first ranks log into the same run under their own node
id, so one run shows every machine of the job. Like all tracking, a failure only warns.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Optional

log = logging.getLogger(__name__)


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
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow system metrics did not stop cleanly (%s: %s)", type(exc).__name__, exc)
