"""The eval's results into MLflow: a child run of the training run the checkpoint belongs to.

A child run (tagged `mlflow.parentRunId`, in the training run's experiment), not the training run itself,
because one checkpoint is evaluated more than once (another probe set, `eval.max_probes`, another baseline):
each evaluation keeps its own params, metrics and artifacts instead of appending to one history and
overwriting the last one's figures, and the training run, which a later `hmtrain train --resume` reopens
and backfills, is left as training wrote it. The MLflow UI shows the child under its training run.

Metric names (stable; README's eval paragraph lists them), each logged at the checkpoint's step:
    eval/<row>/ppl                   held-out perplexity        <row>: memory, generic, anchor, dense
    eval/<row>/ppl/subtree_<k>       ... of level-1 subtree k
    eval/<row>/probe_acc/<bucket>    probe accuracy (0..1)      <bucket>: "1", "2-3", "16plus", "all", ...
    eval/routing_agreement/level_<i>

Tracking never costs a result: the results file and figures are written before, and a failing MLflow
only warns.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hmtrain.util.metric_names import metric_key

log = logging.getLogger(__name__)

ROW_KEYS = {"anchor + fetched memory": "memory", "anchor + generic memory": "generic", "anchor alone": "anchor",
            "dense baseline": "dense"}
RUN_ID_FILE = "mlflow_run.json"  # written by training into its run directory (hmtrain/train/mlflow_logger.py)


def eval_metrics(results: dict) -> dict[str, float]:
    """The results of `evaluate` as flat MLflow metrics (names in the module docstring)."""
    metrics: dict[str, float] = {}
    for row in results["rows"]:
        prefix = f"eval/{ROW_KEYS.get(row['name']) or metric_key(row['name'])}"
        metrics[f"{prefix}/ppl"] = row["perplexity"]
        for node, cell in row.get("subtrees", {}).items():
            metrics[f"{prefix}/ppl/subtree_{node}"] = cell["perplexity"]
        for bucket, accuracy in row.get("probe_accuracy", {}).items():
            key = f"{prefix}/probe_acc/{metric_key(bucket)}"
            if key in metrics:
                raise ValueError(f"probe buckets {bucket!r} and another give the same MLflow metric {key}")
            metrics[key] = accuracy
    for level, agreement in results.get("routing_agreement", {}).items():
        metrics[f"eval/routing_agreement/level_{level.removeprefix('level')}"] = agreement
    return metrics


def training_run(checkpoint: Path) -> Optional[tuple[str, str]]:
    """(tracking URI, run id) of the MLflow run that trained `checkpoint` (a step directory), or None when
    it was trained without MLflow. The run id is the checkpoint's own (trainer.json), the URI the run
    directory's `mlflow_run.json`."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent  # <run_dir>/checkpoints/step_XXXXXXXX
    try:
        saved = json.loads((run_dir / RUN_ID_FILE).read_text())
        record = json.loads((checkpoint / "trainer.json").read_text())
    except (OSError, ValueError):
        return None
    run_id = record.get("mlflow_run_id") or saved.get("run_id")
    uri = saved.get("tracking_uri")
    return (uri, run_id) if uri and run_id else None


def log_eval(results: dict, *, files: Sequence[Path] = (), params: Mapping[str, Any] = (),
             markdown: Optional[str] = None) -> Optional[str]:
    """Log `results` (metrics, the results JSON, `markdown`, `files` under figures/) as a child run of the
    checkpoint's training run; returns the child run's id, or None (with a log line saying why)."""
    found = training_run(Path(results["checkpoint"]))
    if found is None:
        log.warning("eval not logged to MLflow: %s was trained without MLflow (no %s in its run directory)",
                    results["checkpoint"], RUN_ID_FILE)
        return None
    uri, parent = found
    # MLflow's own HTTP retries back off for minutes; a user's MLFLOW_HTTP_REQUEST_* settings take precedence
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    try:
        return _log_child(uri, parent, results, files, dict(params), markdown)
    except Exception as exc:  # noqa: BLE001 - the results are already written; tracking only warns
        log.warning("eval not logged to MLflow run %s at %s: %s: %s", parent, uri, type(exc).__name__,
                    " ".join(str(exc).split())[:300])
        return None


def _log_child(uri: str, parent: str, results: dict, files: Sequence[Path], params: dict,
               markdown: Optional[str]) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_run(parent).info.experiment_id
    child = client.create_run(experiment, run_name=f"eval step {results['step']}",
                              tags={"mlflow.parentRunId": parent, "hmtrain.kind": "eval"}).info.run_id
    now, step = int(time.time() * 1000), int(results["step"])
    metrics = [Metric(k, float(v), now, step) for k, v in eval_metrics(results).items()]
    base = {"checkpoint": results["checkpoint"], "step": step, **params}
    for start in range(0, max(len(metrics), 1), 1000):  # MLflow caps a batch at 1000 metrics and 100 params
        client.log_batch(child, metrics=metrics[start:start + 1000],
                         params=[Param(k, str(v)[:6000]) for k, v in base.items()] if start == 0 else [])
    with tempfile.TemporaryDirectory() as scratch:
        written = Path(scratch) / "results.json"
        written.write_text(json.dumps(results, indent=2))
        client.log_artifact(child, str(written))
        if markdown is not None:
            (Path(scratch) / "results.md").write_text(markdown)
            client.log_artifact(child, str(Path(scratch) / "results.md"))
    for path in files:
        client.log_artifact(child, str(path), "figures")
    client.set_terminated(child, status="FINISHED")
    return child
