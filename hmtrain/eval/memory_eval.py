"""`hmtrain eval` for a memory-model checkpoint: held-out clm loss and copy / blank-copy token accuracy.

Every objective is scored on the same held-out sequences (hmtrain/model/objectives.py says which
positions each one scores): clm is the chunk-wise next-token loss of the model's own context
(memory, none or full); blank copy asks for the first half of the sequence back from a second half
of padding, which only memories (or, with full context, attention) can answer. Chance accuracy is
about the most frequent token's share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.checkpoint.resume import check_data_fingerprints
from hmtrain.checkpoint.verify import CheckpointError, check_complete
from hmtrain.config import Config, ConfigError
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.loader import sequential_batches
from hmtrain.eval.loading import read_checkpoint, resolve_checkpoint
from hmtrain.model import MemoryModel, build_model

EVAL_OBJECTIVES = ("clm", "copy", "blank_copy")


@dataclass
class LoadedMemoryModel:
    path: Path
    cfg: Config
    model: MemoryModel
    step: int
    record: dict


def checkpoint_family(path: str | Path) -> str:
    """`model.family` of the run a checkpoint (or run directory) belongs to; "lm" when that cannot be read,
    so that the LM evaluation reports the problem in its own words and order (data first)."""
    try:
        _, cfg = check_complete(resolve_checkpoint(path))
    except (CheckpointError, FileNotFoundError, ConfigError):
        return "lm"
    return cfg.model.family


def load_memory_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedMemoryModel:
    path, record, cfg = read_checkpoint(path)
    if cfg.model.family != "memory_model":
        raise ValueError(f"checkpoint {path} is an LM (model.family={cfg.model.family!r}), not a memory model")
    model = build_model(cfg).to(device)
    state = {"model": get_model_state_dict(model)}
    Checkpointer.load(path, state)
    set_model_state_dict(model, state["model"])
    model.eval()
    return LoadedMemoryModel(path=path, cfg=cfg, model=model, step=int(record["step"]), record=record)


@torch.no_grad()
def score_memory_model(model: MemoryModel, data: PreparedData, *, batch_size: int, device: torch.device,
                       objectives=EVAL_OBJECTIVES, max_sequences: int = 0) -> dict[str, dict[str, float]]:
    """Per objective: held-out cross-entropy per scored position, token accuracy, positions scored."""
    totals = {o: {"loss_sum": 0.0, "count": 0, "correct": 0} for o in objectives}
    seen = 0
    for batch in sequential_batches(data, "heldout", batch_size):
        tokens = batch["tokens"].to(device)
        for objective in objectives:
            part = model.score(tokens, objective)
            totals[objective] = {k: totals[objective][k] + part[k] for k in part}
        seen += tokens.shape[0]
        if max_sequences and seen >= max_sequences:
            break
    out = {}
    for objective, t in totals.items():
        if t["count"] == 0:
            raise ValueError(f"held-out split has nothing that the {objective} objective scores")
        out[objective] = {"ce": t["loss_sum"] / t["count"], "accuracy": t["correct"] / t["count"],
                          "positions": t["count"]}
    return out


def evaluate_memory_models(cfg: Config, checkpoints: list[str | Path], device: Optional[str] = None) -> dict:
    """Score memory-model checkpoints on `cfg.data.prepared`'s held-out split; one row per checkpoint."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = PreparedData.open(cfg.data.prepared, verify="checksums" if cfg.data.verify_checksums else "sizes")
    rows = []
    for checkpoint in checkpoints:
        loaded = load_memory_model(checkpoint, device)
        data.check_compatible(loaded.cfg)
        check_data_fingerprints(loaded.path, loaded.record, data.fingerprints(), data.root)
        mm = loaded.cfg.memory_model
        # copy and blank copy pair chunk i with chunk i + s/2: an odd number of chunks has only clm
        objectives = EVAL_OBJECTIVES if mm.chunks % 2 == 0 else ("clm",)
        scores = score_memory_model(loaded.model, data, batch_size=cfg.eval.batch_size, device=device,
                                    objectives=objectives, max_sequences=cfg.eval.max_sequences)
        stages = " > ".join(s.objective for s in mm.stages) or mm.objective
        rows.append({"checkpoint": str(loaded.path), "step": loaded.step, "context": mm.context, "block": mm.block,
                     "curriculum": stages, "parameters": sum(p.numel() for p in loaded.model.parameters()),
                     **{f"{o}_{k}": v for o, s in scores.items() for k, v in s.items()}})
    return {"vocab_size": int(data.manifest["vocab_size"]), "rows": rows}


def render_memory(results: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    table = Table(title="memory models on held-out sequences: clm loss, copy and blank-copy token accuracy")
    for column in ("checkpoint", "context", "curriculum", "step", "clm CE", "clm acc", "copy acc", "blank-copy acc"):
        table.add_column(column, justify="left" if column in ("checkpoint", "context", "curriculum") else "right")
    def percent(row: dict, key: str) -> str:
        return f"{100 * row[key]:.1f}%" if key in row else "n/a"

    for row in results["rows"]:
        table.add_row(Path(row["checkpoint"]).parent.parent.name or row["checkpoint"], row["context"],
                      row["curriculum"], str(row["step"]), f"{row['clm_ce']:.3f}", percent(row, "clm_accuracy"),
                      percent(row, "copy_accuracy"), percent(row, "blank_copy_accuracy"))
    console.print(table)
    console.print(f"uniform guessing: CE ln V = {math.log(results['vocab_size']):.3f} (V = {results['vocab_size']})")
