"""Crash-safe checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory `step_XXXXXXXX/` holding DCP shards (anchor, bank rows, both
optimizers, RNG states), `trainer.json` (step, loader position, MLflow run id, data
fingerprints, the hash of `config.yaml`) and the run's `config.yaml`. It is written under
a temporary name and renamed only once complete, then `latest` is updated atomically, so a
crash mid-save leaves the previous checkpoint as the one resumed from. Old checkpoints are
renamed to a hidden name before they are deleted, so a crash mid-prune never leaves a
`step_*` directory that looks complete and is not. DCP reshards on load, so the same files
serve other world sizes.

Every failure to read or write a checkpoint is a `CheckpointError`: one line naming the
checkpoint directory and what is wrong (DCP's own `CheckpointException` derives from
BaseException and carries a multi-rank traceback; it is caught and summarised here).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from hmtrain.checkpoint.verify import CONFIG_FILE, TRAINER_FILE, CheckpointError, describe, read_trainer, verify_files
from hmtrain.data.files import atomic_write

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_durably(path: Path, text: str) -> None:
    # fsynced before the rename: after a power loss the marker or `latest` names a complete checkpoint
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)

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
    def __init__(self, directory: Path, keep: int = 2, process_group: Optional[dist.ProcessGroup] = None):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        # background writes use their own (gloo) group, so they never interleave with training collectives
        self.process_group = process_group
        self._pending: Optional[_Pending] = None

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

    def save(self, step: int, state: dict[str, Any], trainer: dict[str, Any], config_yaml: str,
             write_extra: Optional[Callable[[Path], None]] = None, *, async_save: bool = False,
             on_durable: Optional[Callable[[int, Path], None]] = None) -> Path:
        """Write a checkpoint (every rank calls this); returns its final path.

        `write_extra(tmp_dir)` runs on every rank after the DCP shards, for state kept in another
        library's own format (DeepSpeed's optimizer partitions). With `async_save`, DCP stages the
        state in host memory and writes it in a background thread; the checkpoint is completed
        (marker, rename, `latest`, pruning) by `poll()` or `wait()` once the write is done, and
        `on_durable(step, path)` is called then (at once for a blocking save). One save is in
        flight at a time: a new save first waits for the previous one.
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
                    pending.future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.process_group)
                else:
                    dcp.save(state, checkpoint_id=str(tmp))
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
        return CheckpointError(f"checkpoint {pending.final}: save failed ({describe(exc)}){kept}")

    def _delete(self, step_dir: Path) -> None:
        # rename first: a crash during rmtree then leaves a hidden directory that nothing lists
        doomed = step_dir.with_name(f".{step_dir.name}.deleting")
        if doomed.exists():
            shutil.rmtree(doomed, ignore_errors=True)
        os.replace(step_dir, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self) -> None:
        for old in self.step_dirs()[:-self.keep]:
            self._delete(old)
        for stale in [*self.directory.glob(".step_*.tmp"), *self.directory.glob(".step_*.deleting")]:
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load DCP shards into `state` in place; return the trainer record."""
        path = Path(path)
        record = read_trainer(path)
        verify_files(path)
        try:
            with _quiet_dcp():
                dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise CheckpointError(f"checkpoint {path}: cannot be loaded ({describe(exc)})") from exc
        return record

    @staticmethod
    def read_trainer(path: Path) -> dict[str, Any]:
        return read_trainer(path)
