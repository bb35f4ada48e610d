"""After `evaluate`: the figures beside the results file, and everything into the training run's MLflow."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hmtrain.config import Config, flatten
from hmtrain.data.format.prepared import PreparedData
from hmtrain.eval.evaluate import to_markdown
from hmtrain.eval.figures import eval_figures
from hmtrain.eval.tracking import log_eval


@dataclass
class Published:
    figures: list[Path] = field(default_factory=list)  # empty when they went to MLflow only
    mlflow_run_id: Optional[str] = None  # the eval's child run; None when not logged


def publish(cfg: Config, results: dict, directory: Optional[Path], prefix: str = "") -> Published:
    """Draw the figures into `directory` (None: into a scratch directory, for MLflow only) and, unless
    `logging.mlflow=false`, log results and figures as a child of the checkpoint's training run."""
    manifest = PreparedData.open(cfg.data.prepared, verify=None).manifest
    params = {key: value for key, value in flatten(cfg).items() if key.startswith("eval.")}
    params["data.probes"] = cfg.data.probes
    params.update({"baseline": r["checkpoint"] for r in results["rows"] if r["name"] == "dense baseline"})
    with tempfile.TemporaryDirectory() as scratch:
        figures = eval_figures(results, manifest, directory or Path(scratch), prefix)
        run_id = None
        if cfg.logging.mlflow:
            run_id = log_eval(results, files=figures, params=params, markdown=to_markdown(results))
    return Published(figures=figures if directory is not None else [], mlflow_run_id=run_id)
