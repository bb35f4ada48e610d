"""Load a trained anchor (and its bank) from a checkpoint directory for evaluation.

The anchor goes to the device; the bank is read as weights only, into host memory (hmtrain/memory/
host_bank.py): no optimizer moments are allocated or read, and each lookup moves only the rows its
batch routes to. Its lookups equal the training bank's bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.checkpoint.resume import broken_checkpoint
from hmtrain.checkpoint.verify import CheckpointError, check_complete
from hmtrain.config import Config
from hmtrain.memory import HostBank, build_host_bank, uses_memory
from hmtrain.model import Transformer, build_model, count_parameters


@dataclass
class Trained:
    path: Path
    cfg: Config
    model: Transformer
    bank: Optional[HostBank]  # weights only, in host memory; None for a run without memory
    step: int
    record: dict  # the checkpoint's trainer.json

    @property
    def parameters(self) -> int:
        return count_parameters(self.model.cfg)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints directory (its latest)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    for candidate in (path, path / "checkpoints"):
        if (candidate / "trainer.json").is_file():
            return candidate
        latest = Checkpointer(candidate).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{path}: no hmtrain checkpoint here (expected a step_XXXXXXXX directory, "
                            "or a run directory holding checkpoints/)")


def read_checkpoint(path: str | Path, hint: str = "evaluate it with --checkpoint") -> tuple[Path, dict, Config]:
    """(step directory, trainer record, config) of a checkpoint or run directory to read; a broken one is
    a one-line error naming it and the newest older complete one (which `hint` says how to use)."""
    path = resolve_checkpoint(path)
    try:
        record, cfg = check_complete(path)
    except CheckpointError as exc:
        raise broken_checkpoint(path, str(exc), hint=hint) from exc
    return path, record, cfg


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Trained:
    path, record, cfg = read_checkpoint(path)
    model = build_model(cfg).to(device)  # an HF anchor's architecture from model.hf_path, its weights from here
    bank = None
    state = {"model": get_model_state_dict(model)}
    if uses_memory(cfg):
        bank = build_host_bank(cfg, device)
        state["bank"] = bank.load_template()  # filled in place; DCP reads no key not asked for
    Checkpointer.load(path, state)
    set_model_state_dict(model, state["model"])
    model.eval()
    return Trained(path=path, cfg=cfg, model=model, bank=bank, step=int(record["step"]), record=record)

