"""Crash-safe checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory `step_XXXXXXXX/` holding DCP shards (anchor, bank rows, both
optimizers, RNG states), `trainer.json` (step, loader position, MLflow run id) and the
run's `config.yaml`. It is written under a temporary name and renamed only once complete,
then `latest` is updated atomically, so a crash mid-save leaves the previous checkpoint
as the one resumed from. DCP reshards on load, so the same files serve other world sizes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def step_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted((p for p in found if (p / TRAINER_FILE).is_file()), key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        pointer = self.directory / "latest"
        if pointer.is_file():
            candidate = self.directory / pointer.read_text().strip()
            if (candidate / TRAINER_FILE).is_file():
                return candidate
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def save(self, step: int, state: dict[str, Any], trainer: dict[str, Any], config_yaml: str) -> Path:
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".step_{step:08d}.tmp"
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(tmp)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        if _rank() == 0:
            (tmp / CONFIG_FILE).write_text(config_yaml)
            # trainer.json last: its presence marks the checkpoint complete
            _atomic_write(tmp / TRAINER_FILE, json.dumps({"step": step, **trainer}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.directory / "latest", final.name)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for old in self.step_dirs()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load DCP shards into `state` in place; return the trainer record."""
        path = Path(path)
        trainer_file = path / TRAINER_FILE
        if not trainer_file.is_file():
            raise FileNotFoundError(f"checkpoint {path}: no {TRAINER_FILE}; not a complete hmtrain checkpoint")
        dcp.load(state, checkpoint_id=str(path))
        return json.loads(trainer_file.read_text())

    @staticmethod
    def read_trainer(path: Path) -> dict[str, Any]:
        trainer_file = Path(path) / TRAINER_FILE
        if not trainer_file.is_file():
            raise FileNotFoundError(f"checkpoint {path}: no {TRAINER_FILE}; not a complete hmtrain checkpoint")
        return json.loads(trainer_file.read_text())
