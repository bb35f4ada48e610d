"""The study in MLflow: one parent run (tagged hmtrain.kind=study) holding the spec, the summary and its
figures; each arm x seed's memory training run is its child (`logging.parent_run_id`), and under that run
sit its evaluation (hmtrain/eval/tracking.py) and, with a dense baseline, the baseline's training run.

The parent's id is kept in `<out>/study_run.json`, so a rerun reopens the same run. With
`logging.mlflow=false` nothing is logged. Like all tracking, a failure only warns.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hmtrain.config import Config
from hmtrain.eval.tracking import ROW_KEYS, RUN_ID_FILE, metric_key
from hmtrain.train.mlflow_logger import run_tags

log = logging.getLogger(__name__)

STUDY_RUN_FILE = "study_run.json"


def training_run_id(cfg: Config) -> Optional[str]:
    """The MLflow run id of `cfg`'s run directory (None when it was trained without MLflow)."""
    try:
        return json.loads((Path(cfg.train.run_dir) / RUN_ID_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def study_metrics(summary: dict) -> dict[str, float]:
    """study/<arm>/<row>/ppl (and /ppl_std, /probe_acc/<bucket>, /probe_acc/<bucket>_std): means over seeds;
    study/<arm>/tokens_per_param, and study/<arm>/gain_vs_anchor_pct, gain_vs_dense_pct (and _std)."""
    metrics = {}
    for arm, entry in summary["arms"].items():
        if entry["tokens"]:
            metrics[f"study/{metric_key(arm)}/tokens_per_param"] = entry["tokens"]["tokens_per_parameter"]
        for key, stat in entry["gains"].items():
            metrics[f"study/{metric_key(arm)}/gain_{key}_pct"] = stat["mean"]
            metrics[f"study/{metric_key(arm)}/gain_{key}_pct_std"] = stat["std"]
        for row in entry["summary"]["rows"]:
            prefix = f"study/{metric_key(arm)}/{ROW_KEYS.get(row['name']) or metric_key(row['name'])}"
            for column, stat in row["stats"].items():
                name = "ppl" if column == "perplexity" else f"probe_acc/{metric_key(column.removeprefix('acc '))}"
                scale = 1.0 if column == "perplexity" else 0.01  # accuracies in 0..1, as the eval logs them
                metrics[f"{prefix}/{name}"] = stat["mean"] * scale
                metrics[f"{prefix}/{name}_std"] = stat["std"] * scale
    return metrics


@dataclass
class StudyRun:
    client: object = None
    run_id: Optional[str] = None

    @classmethod
    def open(cls, out: Path, spec, tracking_uri: str, experiment: str, enabled: bool) -> "StudyRun":
        if not enabled:
            return cls()
        try:
            return cls(*_open(Path(out), spec, tracking_uri, experiment))
        except Exception as exc:  # noqa: BLE001 - tracking never stops the study
            log.warning("study not logged to MLflow at %s: %s: %s", tracking_uri, type(exc).__name__,
                        " ".join(str(exc).split())[:300])
            return cls()

    def log_report(self, report, changed: bool) -> None:
        """The summary's metrics, files and figures; a rerun that ran nothing new logs them only if the run
        lacks them (MLflow appends metric history: the same values again would repeat each point)."""
        if self.run_id is None:
            return
        try:
            from mlflow.entities import Metric

            if not changed and self.client.get_run(self.run_id).data.metrics:
                return

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, 0) for k, v in study_metrics(report.summary).items()]
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
            for path in (report.markdown, report.json):
                self.client.log_artifact(self.run_id, str(path))
            for path in report.figures:
                self.client.log_artifact(self.run_id, str(path), "figures")
        except Exception as exc:  # noqa: BLE001
            log.warning("study summary not logged to MLflow run %s: %s: %s", self.run_id, type(exc).__name__,
                        " ".join(str(exc).split())[:300])

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow study run %s not closed: %s", self.run_id, exc)


def _open(out: Path, spec, tracking_uri: str, experiment: str):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    saved = out / STUDY_RUN_FILE
    if saved.is_file():
        record = json.loads(saved.read_text())
        if record.get("tracking_uri") == tracking_uri:
            try:
                run = client.get_run(record["run_id"])
                if run.info.lifecycle_stage != "deleted":
                    client.update_run(run.info.run_id, status="RUNNING")
                    return client, run.info.run_id
            except MlflowException:
                pass  # gone from the store: start a new one
    found = client.get_experiment_by_name(experiment)
    if found is None:
        local = not tracking_uri.startswith(("http://", "https://", "databricks"))
        location = (out / "mlartifacts").resolve().as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    tags = {**run_tags(), "hmtrain.kind": "study", "hmtrain.study": spec.name}
    run_id = client.create_run(experiment_id, run_name=f"study {spec.name}", tags=tags).info.run_id
    params = {"spec": str(spec.path), "base.config": spec.base_config, "arms": ",".join(a.name for a in spec.arms),
              "seeds": ",".join(map(str, spec.seeds)), "eval.dense_baseline": spec.dense_baseline,
              "eval.probes": spec.probes}
    params.update({f"arm.{arm.name}": " ".join(arm.overrides) for arm in spec.arms})
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's limit on params per batch
        client.log_batch(run_id, params=items[start:start + 100])
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "spec.yaml"
        copy.write_text(Path(spec.path).read_text())
        client.log_artifact(run_id, str(copy))
    saved.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}) + "\n")
    return client, run_id
