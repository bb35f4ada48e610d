"""Metric loggers: a two-method interface (`log`, `close`) so backends slot in.

`JsonlLogger` keeps an exact local record in the run directory (the resume test reads
it); `MLflowLogger` tracks the run in MLflow. A tracking failure never stops training:
the MLflow logger warns once and turns itself off.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """One JSON line per logged step. On resume, lines past the checkpoint's step are dropped:
    the interrupted run wrote them after its last checkpoint, and the resumed run redoes them."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def default_tracking_uri(run_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI if set, else a sqlite store inside the run directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


class MLflowLogger:
    """Logs params, metrics and artifacts to MLflow; resumes an existing run by id."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: Optional[str], run_id: Optional[str],
                 artifact_dir: Path):
        self.enabled = True
        self.run_id: Optional[str] = None
        self.tracking_uri = tracking_uri
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is None:
                found = self._client.get_experiment_by_name(experiment)
                if found is None:
                    location = None
                    if not tracking_uri.startswith(("http://", "https://", "databricks")):
                        location = Path(artifact_dir).resolve().as_uri()
                    experiment_id = self._client.create_experiment(experiment, artifact_location=location)
                else:
                    experiment_id = found.experiment_id
                run = self._client.create_run(experiment_id, run_name=run_name)
                run_id = run.info.run_id
            else:
                self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self._mlflow = mlflow
        except Exception as exc:  # noqa: BLE001 - tracking must never kill training
            self._disable("start", exc)

    def _disable(self, what: str, exc: Exception) -> None:
        if self.enabled:
            log.warning("MLflow %s failed (%s: %s); training goes on without MLflow tracking",
                        what, type(exc).__name__, exc)
        self.enabled = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow caps params per batch call
                self._client.log_batch(self.run_id, params=items[start:start + 100])
        except Exception as exc:  # noqa: BLE001
            self._disable("log_params", exc)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if not self.enabled:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._disable("log_artifact", exc)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:  # noqa: BLE001
            self._disable("log", exc)

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._disable("close", exc)


class MultiLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
