"""`MLflowLogger` tracks the run in MLflow so that its history equals `metrics.jsonl` after
any crash and resume. MLflow's metric history is append-only (MLflow 3.x has no call that
deletes or overwrites a logged point), so a step logged before a crash and redone after
the resume would appear twice. Hence MLflow only receives what is durable: `log` buffers,
and `flush(step)`, called once a checkpoint is complete, sends every buffered step up to
it. On resume the steps of `metrics.jsonl` up to the checkpoint that MLflow lacks (a crash
between checkpoint and flush, a failed flush) are sent first. MLflow therefore lags the
live `metrics.jsonl` by at most `train.checkpoint_every` steps. A resume from an older
checkpoint than MLflow has seen (`--resume --fallback` past a broken one) redoes steps
MLflow already holds: they are not sent again. Redone on the same world size they are
bit-identical; on another they differ in the last digits, and a warning says by how much
(MLflow keeps the first values, `metrics.jsonl` the redone ones).

Params are the flattened config plus sizes. MLflow never changes a logged param, so when a
resume or restart runs with other values of keys that may change (the world size, phase
lengths, logging: `may_change`), the first values stay and each new one is a tag
`latest.<key>`.

One MLflow run per run directory: its id is written to `<run_dir>/mlflow_run.json` as soon
as the run exists, so a restart after a crash (even before the first checkpoint) continues
it, unless a restart (not a resume) finds the run holding training metrics or params that
`may_change` does not allow to differ: then it is a new run. A failed call is retried
(`ATTEMPTS` times) and then skipped with a warning; buffered metrics stay buffered for the
next flush; tracking is never switched off for the rest of the run. Start-up against an
unreachable server gives up after `START_TIMEOUT_S` seconds.

Sending is off the training thread: `flush` and `log_artifact` hand their calls, in order, to one
background thread (`hmtrain-mlflow`), so a slow or unreachable server (each call may retry for
`ATTEMPTS` x `REQUEST_TIMEOUT_S`) never stalls a step; `log` only appends to the buffer. `wait()`
returns once everything handed over has been tried; `close()` waits, then ends the run.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from hmtrain.util.files import write_text

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
ATTEMPTS = 3  # tries per MLflow call
RETRY_SLEEP_S = (1.0, 2.0)  # pauses between tries
START_REQUEST_TIMEOUT_S = 5  # one HTTP request at start-up (MLFLOW_HTTP_REQUEST_TIMEOUT, unless set)
REQUEST_TIMEOUT_S = 60  # one HTTP request later on: artifact uploads can be large
START_TIMEOUT_S = 20  # start-up gives up after this long (ATTEMPTS x 5 s + pauses, capped)
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def default_store(run_dir: Path) -> tuple[str, Path]:
    """(tracking URI, artifact root) when the config names no store: $MLFLOW_TRACKING_URI if set, else one
    sqlite store beside the run directories, `<parent>/mlflow.db`, so that runs/mem and runs/dense open side
    by side in one `mlflow ui`. A run directory that holds its own store (written before) keeps it."""
    run_dir = Path(run_dir).resolve()
    root = run_dir if (run_dir / "mlflow.db").exists() else run_dir.parent
    return (os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"), root / "mlartifacts"


def run_tags() -> dict[str, str]:
    """Who ran it, where, and which code: MLflow's own tag names where it has them."""
    import getpass
    import socket

    import hmtrain

    tags = {"mlflow.user": getpass.getuser(), "host": socket.gethostname(), "hmtrain.version": hmtrain.__version__}
    commit = _git_commit(Path(hmtrain.__file__).resolve().parent.parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(root: Path) -> Optional[str]:
    """The commit of hmtrain's checkout (None for an installed wheel, or without git)."""
    import subprocess

    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _param(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a param value


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class MLflowLogger:
    """Logs params, durable metrics and artifacts to the run directory's one MLflow run."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: Optional[str], run_dir: Path,
                 run_id: Optional[str] = None, resume: bool = False, params: Optional[Mapping[str, Any]] = None,
                 artifact_dir: Optional[Path] = None, may_change: Callable[[str], bool] = lambda key: False,
                 parent_run_id: Optional[str] = None):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id  # a new run is created as this run's child
        self.run_dir = Path(run_dir)
        self.run_id: Optional[str] = None
        self.is_new = False  # this process created the run (or restarted one that had no history)
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._lock = threading.Lock()  # `_pending` and `_taken`: the training thread logs, the sender sends
        self._sender: Optional[ThreadPoolExecutor] = None  # one thread, so calls keep their order
        self._handed: list[Future] = []
        self._closed = False
        self._durable_step = -1  # the last step a checkpoint made durable
        self._held: dict[int, float] = {}  # on resume: step -> value of `_held_key` that MLflow already holds
        self._held_key = "loss"
        self._taken: dict[int, int] = {}  # step -> when it was logged (ms since the epoch)
        self._may_change = may_change
        self._logged_params: dict[str, str] = {}  # the run's params when this process found it
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
        if params:
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
            if fresh_restart and not self._may_continue(run, params):
                log.info("MLflow run %s of %s has training metrics or other params; starting a new run",
                         candidate, self.run_dir)
                continue
            self.run_id = candidate
            self._logged_params = dict(run.data.params)
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
        tags = {**run_tags(), **({"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {})}
        self.run_id = self._client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.is_new = True
        self._persist()

    def _may_continue(self, run, params: Mapping[str, Any]) -> bool:
        """A restart (killed before its first checkpoint) continues a run that holds no training metrics
        (system metrics do not count) and no param it may not change."""
        if any(not key.startswith("system/") for key in run.data.metrics):
            return False
        logged = run.data.params
        return all(self._may_change(k) for k, v in params.items() if k in logged and logged[k] != _param(v))

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
        from mlflow.entities import Param, RunTag

        logged = self._logged_params
        items = [Param(k, _param(v)) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"latest.{k}", _param(v)) for k, v in params.items()
                   if k in logged and logged[k] != _param(v)]
        if changed:
            log.info("MLflow keeps this run's first params; the changed ones are tags: %s",
                     ", ".join(f"{t.key}={t.value}" for t in changed))
        for start in range(0, max(len(items), len(changed)), 100):  # MLflow caps params and tags per batch call
            params_chunk, tags_chunk = items[start:start + 100], changed[start:start + 100]
            self._call("log_params", lambda: self._client.log_batch(self.run_id, params=params_chunk,
                                                                      tags=tags_chunk))
        self._logged_params.update({p.key: p.value for p in items})

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if not self.enabled:
            return
        self._hand_over(lambda: self._call(f"log_artifact {path}",
                                           lambda: self._client.log_artifact(self.run_id, str(path), artifact_path)))

    # -- the sender thread ---------------------------------------------------------------------

    def _hand_over(self, call: Callable[[], Any]) -> None:
        if self._closed:  # after close (a results file logged last): nobody would wait for the thread
            call()
            return
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hmtrain-mlflow")
        self._handed = [f for f in self._handed if not f.done()]
        self._handed.append(self._sender.submit(call))

    def wait(self) -> None:
        """Return once every call handed to the sender has been tried (`_call` never raises)."""
        for future in self._handed:
            future.result()
        self._handed = []

    # -- metrics -------------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one step; MLflow gets it at the next `flush` covering it."""
        with self._lock:
            self._pending.append((step, {k: float(v) for k, v in metrics.items()}))
            self._taken[step] = int(time.time() * 1000)  # MLflow shows when the step ran, not when it was sent

    def flush(self, upto_step: int) -> None:
        """Have the sender send the buffered steps <= `upto_step` (call once a checkpoint at that step is
        complete); returns at once."""
        if not self.enabled:
            return
        self._durable_step = max(self._durable_step, upto_step)
        self._hand_over(lambda: self._send_durable(upto_step))

    def _send_durable(self, upto_step: int) -> None:
        with self._lock:
            ready = [(s, m) for s, m in self._pending if s <= upto_step]
            redone = [(s, m) for s, m in ready if s in self._held]
            if redone:
                skipped = {s for s, _ in redone}
                ready = [(s, m) for s, m in ready if s not in skipped]
                self._pending = [(s, m) for s, m in self._pending if s not in skipped]
        if redone:
            self._skip_redone(redone)
        sent = self._send(ready)
        done = {s for s, _ in ready[:sent]}
        with self._lock:
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
        held: dict[int, float] = {}
        ok = self._call("backfill", lambda: held.update(
            (m.step, m.value) for m in self._client.get_metric_history(self.run_id, key)))
        if not ok:
            return
        self._held, self._held_key = held, key  # every step is logged whole: one key tells which steps it holds
        missing = [(int(r["step"]), {k: float(v) for k, v in r.items() if k != "step"})
                   for r in records if int(r["step"]) not in held]
        if missing:
            log.info("MLflow: backfilling %d steps from metrics.jsonl", len(missing))
            self._send(missing)

    def _skip_redone(self, redone: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Steps MLflow held before this resume and this process redid (a fallback to an older checkpoint)."""
        key = self._held_key
        gaps = [abs(m[key] - self._held[s]) for s, m in redone if key in m]
        first, last = redone[0][0], redone[-1][0]
        if gaps and max(gaps) > 0:
            log.warning("MLflow already holds steps %d-%d from before this resume and keeps those values; the redone "
                        "steps differ by up to %.3g in %s (metrics.jsonl holds the redone ones)", first, last,
                        max(gaps), key)
        else:
            log.info("MLflow already holds steps %d-%d; the redone steps equal them and are not sent again", first,
                     last)
        for s, _ in redone:
            self._held.pop(s)

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
                with self._lock:
                    taken = self._taken.get(step, int(time.time() * 1000))  # (a backfilled step: now)
                batch.extend(Metric(k, v, taken, step) for k, v in metrics.items())
                count += 1
            if not self._call("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=batch)):
                return sent  # the rest stays buffered for the next flush
            with self._lock:
                for step, _ in steps[index:index + count]:
                    self._taken.pop(step, None)
            index += count
            sent += count
        return sent

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self.flush(self._durable_step)  # what an earlier flush could not send
        self.wait()
        self._sender.shutdown()
        self._sender, self._closed = None, True
        if self._pending:
            log.debug("MLflow: %d steps past the last checkpoint not sent (a resume redoes them)",
                      len(self._pending))
        self._call("close", lambda: self._client.set_terminated(self.run_id, status=status))
