"""Crash-safe checkpoints with torch.distributed.checkpoint (DCP): the run's states, saved together.

The trainer hands the `Checkpointer` its states once, as a `states` mapping (torchtitan's): each owns
`state_dict()` / `load_state_dict()`. `engine` (the anchor's weights and optimizer, at the top level of
the DCP state, under `model` / `optim`, where eval reads the weights) and `bank` go into DCP shards;
`train` (step, optimizer phase, MLflow run id, data fingerprints, mode, world size, format) and
`loader` (its position) into `trainer.json`, with the hash of the run's `config.yaml`. The
Checkpointer owns the cadence: `save(step, last=...)` writes every `every` steps, at the last step
and when a stop is requested.

A checkpoint is a directory `step_XXXXXXXX/` holding the DCP shards, `trainer.json` and `config.yaml`.
It is written under a temporary name and renamed only once complete (the fsynced `trainer.json` marks
it so), then `latest` is updated atomically, so a crash mid-save leaves the previous checkpoint as
the one resumed from. Old checkpoints are renamed to a hidden name before they are deleted, so a
crash mid-prune never leaves a `step_*` directory that looks complete and is not. DCP reshards on
load, so the same files serve other world sizes. Checkpoints of an older format load through
hmtrain/checkpoint/formats.py.

No RNG state is saved, and none needs to be: nothing in a run draws from a stateful generator after
the initial weights (built from `train.seed` on every rank). Every later random choice (the data
order, which sequences use the generic memory, a curriculum stage's re-initialisation, the bank's
initial rows) is a pure function of the seed, the step or stage, and the sequence or row id, so a
resumed run draws exactly what the uninterrupted one did. New code that needs randomness during
training must keep to that rule (derive a generator from seed and step), or its state must become
a checkpoint state.

Every failure to read or write a checkpoint is a `CheckpointError` (hmtrain/checkpoint/verify.py); a save
that failed for want of space says so, however deep torch or DCP buried the ENOSPC (`_out_of_space`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from hmtrain.checkpoint.formats import as_saved
from hmtrain.checkpoint.verify import CONFIG_FILE, TRAINER_FILE, CheckpointError, describe, read_trainer, verify_files
from hmtrain.util.faults import fault_point
from hmtrain.util.files import atomic_write

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
ENGINE, TRAIN, LOADER = "engine", "train", "loader"  # the states the Checkpointer places specially (above)


class Stateful(Protocol):
    """A checkpoint state. It may also define `load_template()`, the state a checkpoint loads into when
    that differs from what it saves (the bank's saved form holds relaid-out copies), and
    `save_extra(directory)`, for state kept in another library's format (DeepSpeed's optimizer)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_durably(path: Path, text: str) -> None:
    # fsynced before the rename: after a power loss the marker or `latest` names a complete checkpoint
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _out_of_space(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC (or EDQUOT) behind a failed save, if any. torch.save into a full disk raises
    "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598", the OSError only its
    `__context__`; DCP wraps each rank's failure in a CheckpointException."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        if isinstance(current, CheckpointException):
            todo += [inner for inner, _trace in current.failures.values()]
        todo += [current.__cause__, current.__context__]
    return None


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return path


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    # DCP warns on every single-process save/load; that is the intended use here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass
class _Pending:
    """A save whose shards are (being) written and whose completion is still to do."""

    step: int
    tmp: Path
    final: Path
    trainer: dict[str, Any]
    config_yaml: str
    on_durable: Optional[Callable[[int, Path], None]]
    future: Optional[Future] = None


class Checkpointer:
    def __init__(self, directory: Path, states: Optional[Mapping[str, Stateful]] = None, *, every: int = 0,
                 keep: int = 2, config_yaml: str = "", async_save: bool = False,
                 process_group: Optional[dist.ProcessGroup] = None,
                 on_durable: Optional[Callable[[int, Path], None]] = None):
        """`states` may be left out to list or read checkpoints only. `every`: the save cadence in steps
        (0: only the last step and stops); `on_durable(step, path)` runs once a checkpoint is complete."""
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.states = dict(states or {})
        self.every, self.keep, self.config_yaml, self.async_save = every, keep, config_yaml, async_save
        # background writes use a (gloo) group nothing else uses: they run in another thread, so
        # on a shared group their collectives would interleave with the loop's differently per rank
        self.process_group = process_group
        self.on_durable = on_durable
        self._pending: Optional[_Pending] = None
        # old checkpoints are renamed out of sight on the calling thread and removed on this one, so a prune
        # of tens of GB never holds up a step; `close` waits for the removals
        self._remover: Optional[ThreadPoolExecutor] = None
        self._removals: list[Future] = []
        self._stager: Optional[DefaultStager] = None  # one for the run: its host copies are reused

    def stager(self) -> DefaultStager:
        """The host copies background saves write from, made once and reused by every save (DCP's own
        default makes new ones per save): a tensor that lives across steps (weights, moments, bank rows)
        is staged into the same buffer each time, pinned on CUDA so the device-to-host copy runs at full
        speed. Staging stays on the calling thread, so a save holds the state of its step exactly while
        the next step updates the originals."""
        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))
        return self._stager

    def step_dirs(self) -> list[Path]:
        """Checkpoints whose completeness marker exists, oldest first. Directories being
        written or deleted carry hidden names and are never listed."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted((p for p in found if (p / TRAINER_FILE).is_file()), key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        pointer = self.directory / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            if _STEP_DIR.match(name) and (self.directory / name / TRAINER_FILE).is_file():
                return self.directory / name
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def due(self, step: int, *, last: bool = False, now: bool = False) -> bool:
        """Whether `save` with these arguments writes a checkpoint."""
        return last or now or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, *, last: bool = False, now: bool = False) -> Optional[Path]:
        """Checkpoint the states after `step` if the cadence asks for it (`last`: the run's final step;
        `now`: a stop was requested); returns the checkpoint's path, or None. Those two block; others
        write in the background with `async_save`."""
        if not self.due(step, last=last, now=now):
            return None
        tensors = self._flat({name: state.state_dict() for name, state in self._dcp_states()})
        trainer = {**self.states[TRAIN].state_dict(), LOADER: self.states[LOADER].state_dict()}
        extras = [state.save_extra for state in self.states.values() if hasattr(state, "save_extra")]
        return self.write(step, tensors, trainer, self.config_yaml,
                          write_extra=(lambda directory: [extra(directory) for extra in extras]) if extras else None,
                          async_save=self.async_save and not (last or now), on_durable=self.on_durable)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load checkpoint `path` into every state; returns its trainer record."""
        templates = {name: getattr(state, "load_template", state.state_dict)() for name, state in self._dcp_states()}
        record = self.load(path, self._flat(templates))
        for name, template in templates.items():
            self.states[name].load_state_dict(template)
        self.states[TRAIN].load_state_dict(record)
        self.states[LOADER].load_state_dict(record[LOADER])
        return record

    def _dcp_states(self) -> list[tuple[str, Stateful]]:
        return [(name, state) for name, state in self.states.items() if name not in (TRAIN, LOADER)]

    @staticmethod
    def _flat(per_state: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """What goes into DCP shards: the engine's entries at the top level, every other state under its name."""
        out = dict(per_state.get(ENGINE, {}))
        out.update({name: state for name, state in per_state.items() if name != ENGINE})
        return out

    def write(self, step: int, state: dict[str, Any], trainer: dict[str, Any], config_yaml: str,
              write_extra: Optional[Callable[[Path], None]] = None, *, async_save: bool = False,
             on_durable: Optional[Callable[[int, Path], None]] = None) -> Path:
        """Write a checkpoint (every rank calls this); returns its final path.

        `write_extra(tmp_dir)` runs on every rank after the DCP shards, for state kept in another
        library's own format (DeepSpeed's optimizer partitions). With `async_save`, DCP stages the
        state in host memory and writes it in a background thread; the checkpoint is completed
        (marker, rename, `latest`, pruning) by `poll()` or `wait()` once the write is done, and
        `on_durable(step, path)` is called then (at once for a blocking save). One save is in
        flight at a time: a new save first waits for the previous one. `save` calls this with the states.
        """
        self.wait()
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".step_{step:08d}.tmp"
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(tmp)
        _barrier()
        pending = _Pending(step, tmp, final, trainer, config_yaml, on_durable)
        try:
            with _quiet_dcp():
                if async_save:
                    pending.future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.process_group,
                                                    async_stager=self.stager())
                    fault_point("async_save", step)
                else:  # on the checkpoint's own group too (its timeout; the previous save has finished)
                    dcp.save(state, checkpoint_id=str(tmp), process_group=self.process_group)
            if write_extra is not None:
                write_extra(tmp)
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise self._failed(pending, exc) from exc
        self._pending = pending
        if not async_save:
            _barrier()  # every rank's extra files are written
            self.wait()
            _barrier()
        return final

    def poll(self) -> None:
        """Complete a background save whose write has finished (cheap; call once per step)."""
        if self._pending is not None and (self._pending.future is None or self._pending.future.done()):
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is written, then complete it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            if pending.future is not None:
                pending.future.result()
            if _rank() == 0:
                (pending.tmp / CONFIG_FILE).write_text(pending.config_yaml)
                record = {"step": pending.step, **pending.trainer,
                          "config_sha256": hashlib.sha256(pending.config_yaml.encode()).hexdigest()}
                # trainer.json last: its presence marks the checkpoint complete
                _write_durably(pending.tmp / TRAINER_FILE, json.dumps(record, indent=2))
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise self._failed(pending, exc) from exc
        if _rank() == 0:
            if pending.final.exists():
                self._delete(pending.final)
            os.replace(pending.tmp, pending.final)
            _write_durably(self.directory / "latest", pending.final.name)
            self._prune()
        if pending.on_durable is not None:
            pending.on_durable(pending.step, pending.final)

    def _failed(self, pending: "_Pending", exc: BaseException) -> CheckpointError:
        if _rank() == 0:
            shutil.rmtree(pending.tmp, ignore_errors=True)
        previous = self.latest()
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        full = _out_of_space(exc)
        reason = describe(exc) if full is None else (
            f"{os.strerror(full.errno).lower()} while writing {full.filename or pending.tmp}, on the filesystem "
            f"mounted at {_mount_point(self.directory)}")
        error = CheckpointError(f"checkpoint {pending.final}: save failed ({reason}){kept}")
        error.input_error = False
        error.environment = full is not None  # a full disk is not hmtrain's fault: no "internal error" prefix
        return error

    def _delete(self, step_dir: Path) -> None:
        # rename first: a crash during rmtree then leaves a hidden directory that nothing lists
        doomed = step_dir.with_name(f".{step_dir.name}.deleting")
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(step_dir, doomed)
        self._remove_later(doomed)

    def _prune(self) -> None:
        for old in self.step_dirs()[:-self.keep]:
            self._delete(old)
        # leftovers of a crash; renamed here, on the calling thread, so no later save's directory is touched
        for stale in self.directory.glob(".step_*.tmp"):
            self._delete(stale)
        for stale in self.directory.glob(".step_*.deleting"):
            self._remove_later(stale)

    def _remove_later(self, doomed: Path) -> None:
        if self._remover is None:
            self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hmtrain-prune")
        self._removals = [f for f in self._removals if not f.done()]
        self._removals.append(self._remover.submit(lambda: shutil.rmtree(doomed, ignore_errors=True)))

    def close(self) -> None:
        """Complete the save in flight and wait for old checkpoints' removal (the end of a run)."""
        try:
            self.wait()
        finally:
            for removal in self._removals:
                try:
                    removal.result()
                except BaseException:  # a removal that failed leaves a hidden directory; the next prune retries
                    log.warning("removing an old checkpoint failed", exc_info=True)
            self._removals = []
            if self._stager is not None:
                self._stager.close()  # frees the host copies
                self._stager = None

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load DCP shards into `state` (a state dict, as saved) in place, whatever the checkpoint's
        format; return the trainer record."""
        path = Path(path)
        record = read_trainer(path)
        verify_files(path)
        try:
            with _quiet_dcp():
                dcp.load(as_saved(state, record), checkpoint_id=str(path))
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise CheckpointError(f"checkpoint {path}: cannot be loaded ({describe(exc)})") from exc
        return record
