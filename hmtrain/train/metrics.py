"""Metric loggers: a two-method interface (`log`, `close`) so backends slot in.

`JsonlLogger` keeps an exact, live record in the run directory; on resume it drops the
lines past the checkpoint (the resumed run redoes those steps) and a line torn by a crash.

`MLflowLogger` tracks the run in MLflow so that its history equals `metrics.jsonl` after
any crash and resume. MLflow's metric history is append-only (MLflow 3.x has no call that
deletes or overwrites a logged point), so a step logged before a crash and redone after
the resume would appear twice. Hence MLflow only receives what is durable: `log` buffers,
and `flush(step)`, called once a checkpoint is complete, sends every buffered step up to
it. On resume the steps of `metrics.jsonl` up to the checkpoint that MLflow lacks (a crash
between checkpoint and flush, a failed flush) are sent first. MLflow therefore lags the
live `metrics.jsonl` by at most `train.checkpoint_every` steps.

One MLflow run per run directory: its id is written to `<run_dir>/mlflow_run.json` as soon
as the run exists, so a restart after a crash (even before the first checkpoint) continues
it. A failed call is retried (`ATTEMPTS` times) and then skipped with a warning; buffered
metrics stay buffered for the next flush; tracking is never switched off for the rest of
the run. Start-up against an unreachable server gives up after `START_TIMEOUT_S` seconds.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from hmtrain.util.files import write_text

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
ATTEMPTS = 3  # tries per MLflow call
RETRY_SLEEP_S = (1.0, 2.0)  # pauses between tries
START_REQUEST_TIMEOUT_S = 5  # one HTTP request at start-up (MLFLOW_HTTP_REQUEST_TIMEOUT, unless set)
REQUEST_TIMEOUT_S = 60  # one HTTP request later on: artifact uploads can be large
START_TIMEOUT_S = 20  # start-up gives up after this long (ATTEMPTS x 5 s + pauses, capped)
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


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


def default_tracking_uri(run_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI if set, else a sqlite store inside the run directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class MLflowLogger:
    """Logs params, durable metrics and artifacts to the run directory's one MLflow run."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: Optional[str], run_dir: Path,
                 run_id: Optional[str] = None, resume: bool = False, params: Optional[Mapping[str, Any]] = None,
                 artifact_dir: Optional[Path] = None):
        self.tracking_uri = tracking_uri
        self.run_dir = Path(run_dir)
        self.run_id: Optional[str] = None
        self.is_new = False  # this process created the run (or restarted one that had no history)
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._durable_step = -1  # the last step a checkpoint made durable
        self.last_error: Optional[BaseException] = None
        # MLflow's own HTTP retries back off for minutes: retry here instead, with bounded timeouts
        # (a user's MLFLOW_HTTP_REQUEST_* settings take precedence)
        self._user_timeout = "MLFLOW_HTTP_REQUEST_TIMEOUT" in os.environ
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self._request_timeout(START_REQUEST_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)
        except Exception as exc:  # noqa: BLE001 - tracking must never kill training
            log.warning("MLflow start failed (%s); training goes on without MLflow tracking", _one_line(exc))
            self._client = None
            self._request_timeout(REQUEST_TIMEOUT_S)
            return
        started = self._call("start", lambda: self._start(experiment, run_name, run_id, resume, dict(params or {}),
                                                           artifact_dir), deadline=deadline, warn=False)
        self._request_timeout(REQUEST_TIMEOUT_S)
        if not started:
            log.warning("MLflow start failed (%s) against %s after %d tries (start-up waits at most %d s); "
                        "training goes on without MLflow tracking; a later `hmtrain train --resume` backfills the "
                        "run from metrics.jsonl", _one_line(self.last_error), tracking_uri, ATTEMPTS,
                        START_TIMEOUT_S)
            self.run_id = None
            return
        if self.is_new and params:
            self.log_params(params)

    def _request_timeout(self, seconds: int) -> None:
        if not self._user_timeout:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(seconds)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    # -- start ---------------------------------------------------------------------------------

    def _persisted_run_id(self) -> Optional[str]:
        try:
            saved = json.loads((self.run_dir / RUN_ID_FILE).read_text())
        except (OSError, ValueError):
            return None
        if isinstance(saved, dict) and saved.get("tracking_uri") == self.tracking_uri:
            return saved.get("run_id")
        return None

    def _persist(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / RUN_ID_FILE
        write_text(path, json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}) + "\n")

    def _existing_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

    def _start(self, experiment: str, run_name: Optional[str], run_id: Optional[str], resume: bool,
               params: dict[str, Any], artifact_dir: Optional[Path]) -> None:
        # idempotent, so a retry after a partial failure neither loses nor duplicates the run
        for candidate in dict.fromkeys(c for c in (self.run_id, run_id, self._persisted_run_id()) if c):
            run = self._existing_run(candidate)
            if run is None:
                continue
            fresh_restart = not resume and candidate != self.run_id
            if fresh_restart:
                logged = {k: v for k, v in run.data.params.items()}
                conflicting = [k for k, v in params.items() if k in logged and logged[k] != str(v)[:6000]]
                if run.data.metrics or conflicting:
                    log.info("MLflow run %s of %s has history or other params; starting a new run", candidate,
                             self.run_dir)
                    continue
            self.run_id = candidate
            self.is_new = self.is_new or fresh_restart
            if self._persisted_run_id() != candidate:
                self._persist()
            if run.info.status != "RUNNING":
                self._client.update_run(candidate, status="RUNNING")
            return
        found = self._client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if artifact_dir is not None and not self.tracking_uri.startswith(("http://", "https://", "databricks")):
                location = Path(artifact_dir).resolve().as_uri()
            experiment_id = self._client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        self.is_new = True
        self._persist()

    # -- calls with retries --------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any], deadline: Optional[float] = None, warn: bool = True) -> bool:
        """Run `fn` up to ATTEMPTS times; False (with a warning) if every try failed."""
        for attempt in range(ATTEMPTS):
            try:
                fn()
                return True
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                self.last_error = exc
                pause = RETRY_SLEEP_S[min(attempt, len(RETRY_SLEEP_S) - 1)]
                if attempt == ATTEMPTS - 1 or (deadline is not None and time.monotonic() + pause > deadline):
                    break
                log.debug("MLflow %s failed (%s); retrying in %.0f s", what, _one_line(exc), pause)
                time.sleep(pause)
        if warn:
            log.warning("MLflow %s failed %d times (%s); skipped, tracking goes on", what, attempt + 1,
                        _one_line(self.last_error))
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps params per batch call
            chunk = items[start:start + 100]
            self._call("log_params", lambda: self._client.log_batch(self.run_id, params=chunk))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if not self.enabled:
            return
        self._call(f"log_artifact {path}", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    # -- metrics -------------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one step; MLflow gets it at the next `flush` covering it."""
        self._pending.append((step, {k: float(v) for k, v in metrics.items()}))

    def flush(self, upto_step: int) -> None:
        """Send the buffered steps <= `upto_step` (call once a checkpoint at that step is complete)."""
        if not self.enabled:
            return
        self._durable_step = max(self._durable_step, upto_step)
        ready = [(s, m) for s, m in self._pending if s <= upto_step]
        sent = self._send(ready)
        done = {s for s, _ in ready[:sent]}
        self._pending = [(s, m) for s, m in self._pending if s not in done]

    def backfill(self, records: Sequence[Mapping[str, Any]]) -> None:
        """On resume: send the durable `metrics.jsonl` records that MLflow does not hold yet."""
        if not self.enabled or not records:
            return
        common = set.intersection(*(set(r) - {"step"} for r in records))
        if not common:
            log.warning("MLflow backfill skipped: metrics.jsonl records share no metric")
            return
        key = "loss" if "loss" in common else sorted(common)[0]
        logged: set[int] = set()
        ok = self._call("backfill", lambda: logged.update(
            m.step for m in self._client.get_metric_history(self.run_id, key)))
        if not ok:
            return
        missing = [(int(r["step"]), {k: float(v) for k, v in r.items() if k != "step"})
                   for r in records if int(r["step"]) not in logged]
        if missing:
            log.info("MLflow: backfilling %d steps from metrics.jsonl", len(missing))
            self._send(missing)

    def _send(self, steps: Sequence[tuple[int, Mapping[str, float]]]) -> int:
        """Send whole steps in batches, in order; returns how many steps were sent."""
        from mlflow.entities import Metric

        sent, index = 0, 0
        while index < len(steps):
            batch, count = [], 0
            while index + count < len(steps):
                step, metrics = steps[index + count]
                if batch and len(batch) + len(metrics) > MAX_METRICS_PER_BATCH:
                    break
                now = int(time.time() * 1000)
                batch.extend(Metric(k, v, now, step) for k, v in metrics.items())
                count += 1
            if not self._call("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=batch)):
                return sent  # the rest stays buffered for the next flush
            index += count
            sent += count
        return sent

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.flush(self._durable_step)  # what an earlier flush could not send
        if self._pending:
            log.debug("MLflow: %d steps past the last checkpoint not sent (a resume redoes them)",
                      len(self._pending))
        self._call("close", lambda: self._client.set_terminated(self.run_id, status=status))


class MultiLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
