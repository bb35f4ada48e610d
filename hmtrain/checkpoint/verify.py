"""Reading a checkpoint without loading it: is it complete, what does it record, which config made it.

Every failure to read a checkpoint is a `CheckpointError`: one line naming the checkpoint directory
and what is wrong (DCP's own `CheckpointException` derives from BaseException and carries a
multi-rank traceback; `describe` summarises it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from hmtrain.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
METADATA_FILE = ".metadata"
# what a trainer.json must hold to be resumed from
TRAINER_KEYS = ("step", "loader")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory."""

    input_error = True  # exit 2 (hmtrain/exits.py) for a checkpoint given that cannot be read; a failed save is 1


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

