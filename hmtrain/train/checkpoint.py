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
import pickle
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from hmtrain.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
METADATA_FILE = ".metadata"
# what a trainer.json must hold to be resumed from
TRAINER_KEYS = ("step", "loader")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory."""

    input_error = True  # exit 2 (hmtrain/exits.py) for a checkpoint given that cannot be read; a failed save is 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def describe(exc: BaseException) -> str:
    """One line for an exception, unwrapping DCP's per-rank CheckpointException."""
    if isinstance(exc, CheckpointException) and exc.failures:
        _rank_, (inner, _trace) = min(exc.failures.items(), key=lambda kv: kv[0])
        return describe(inner)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    # DCP warns on every single-process save/load; that is the intended use here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def verify_files(path: Path) -> None:
    """Cheap completeness check before loading: DCP's metadata reads, and every byte range it
    names lies inside an existing file. Catches truncated or deleted shard files and a
    truncated `.metadata` without touching the state being loaded into."""
    path = Path(path)
    metadata_file = path / METADATA_FILE
    if not metadata_file.is_file():
        raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} is missing")
    try:
        with metadata_file.open("rb") as f:
            metadata = pickle.load(f)  # our own file, written by dcp.save
        storage = metadata.storage_data
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
        raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} is unreadable ({describe(exc)}); "
                              "the file is truncated or corrupt") from exc
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        data_file = path / name
        if not data_file.is_file():
            raise CheckpointError(f"checkpoint {path}: data file {name} is missing")
        actual = data_file.stat().st_size
        if actual < size:
            raise CheckpointError(f"checkpoint {path}: data file {name} is truncated ({actual} bytes, "
                                  f"its metadata needs {size})")


def read_trainer(path: Path) -> dict[str, Any]:
    """The trainer record of a complete checkpoint, checked."""
    path = Path(path)
    trainer_file = path / TRAINER_FILE
    if not trainer_file.is_file():
        raise CheckpointError(f"checkpoint {path}: no {TRAINER_FILE}; not a complete hmtrain checkpoint")
    try:
        record = json.loads(trainer_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {TRAINER_FILE} is not valid JSON ({describe(exc)}); "
                              "the file is truncated or corrupt") from exc
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {path}: {TRAINER_FILE} holds a JSON {type(record).__name__}, "
                              "expected an object")
    missing = [key for key in TRAINER_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"checkpoint {path}: {TRAINER_FILE} lacks {', '.join(missing)}")
    if not isinstance(record["step"], int) or record["step"] < 0:
        raise CheckpointError(f"checkpoint {path}: {TRAINER_FILE} has step {record['step']!r}, "
                              "expected an integer >= 0")
    return record


def _leaf_keys(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        out: set[str] = set()
        for key, value in node.items():
            out |= _leaf_keys(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix}


def read_config(path: Path, record: Optional[dict] = None) -> Config:
    """The checkpoint's config, loaded strictly: a truncated or edited file is refused
    instead of being filled in with schema defaults."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    where = f"checkpoint {path}: {CONFIG_FILE}"
    if not config_file.is_file():
        raise CheckpointError(f"{where} is missing")
    raw = config_file.read_bytes()
    expected = (record or {}).get("config_sha256")
    verified = expected is not None
    if verified and hashlib.sha256(raw).hexdigest() != expected:
        raise CheckpointError(f"{where} does not match the hash recorded in {TRAINER_FILE}; "
                              "the file is truncated or was edited")
    if not raw.endswith(b"\n"):
        raise CheckpointError(f"{where} does not end with a newline; the file is truncated")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(config_file))
    except Exception as exc:  # noqa: BLE001 - yaml's errors
        raise CheckpointError(f"{where} is not valid YAML ({describe(exc)})") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{where} is not a mapping of config sections")
    missing = sorted(_leaf_keys(OmegaConf.to_container(OmegaConf.structured(Config))) - _leaf_keys(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        if not verified:  # no hash to tell an older version's config from a truncated one: refuse
            raise CheckpointError(f"{where} lacks keys {shown}; the file is truncated")
        # the file is exactly what was saved, by a version of hmtrain that had fewer settings
        log.warning("%s was written by an older hmtrain without %s; those take their defaults", where, shown)
    try:
        return load_config(config_file)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def check_complete(path: Path) -> tuple[dict[str, Any], Config]:
    """Everything short of loading tensors: trainer.json, config.yaml and the shard files.
    Returns (trainer record, config); raises CheckpointError naming what is wrong."""
    record = read_trainer(path)
    cfg = read_config(path, record)
    verify_files(path)
    return record, cfg


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
                _atomic_write(pending.tmp / TRAINER_FILE, json.dumps(record, indent=2))
        except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
            raise self._failed(pending, exc) from exc
        if _rank() == 0:
            if pending.final.exists():
                self._delete(pending.final)
            os.replace(pending.tmp, pending.final)
            _atomic_write(self.directory / "latest", pending.final.name)
            self._prune()
        if pending.on_durable is not None:
            pending.on_durable(pending.step, pending.final)

    def _failed(self, pending: "_Pending", exc: BaseException) -> CheckpointError:
        if _rank() == 0:
            shutil.rmtree(pending.tmp, ignore_errors=True)
        previous = self.latest()
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        error = CheckpointError(f"checkpoint {pending.final}: save failed ({describe(exc)}){kept}")
        error.input_error = False
        return error

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
