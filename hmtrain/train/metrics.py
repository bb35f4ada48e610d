"""Metric loggers: a two-method interface (`log`, `close`) so backends slot in.

`JsonlLogger` keeps an exact, live record in the run directory; on resume it drops the
lines past the checkpoint (the resumed run redoes those steps) and a line torn by a crash.
MLflow is the other backend (hmtrain/train/mlflow_logger.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol

from hmtrain.util.files import write_text

log = logging.getLogger(__name__)

class MetricLogger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (the process died mid-write) is dropped
    with a warning; an invalid line anywhere else is an error naming the file and line."""
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = lineno == len(lines)  # only a line without its newline can be torn
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("expected an object with an integer 'step'")
        except (ValueError, UnicodeDecodeError) as exc:
            what = f"{exc.msg}: column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            if last:
                log.warning("%s: dropping the torn last line %d (%s); the run stopped while writing it",
                            path, lineno, what)
                break
            raise ValueError(f"{path}: line {lineno} is not a metrics record ({what}); "
                             "only a torn last line is tolerated") from exc
        records.append(record)
    return records


class JsonlLogger:
    """One JSON line per logged step. On resume, lines past the checkpoint's step are dropped:
    the interrupted run wrote them after its last checkpoint, and the resumed run redoes them.
    `records` holds the kept lines (what MLflow must also hold)."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            self.records = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MultiLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
