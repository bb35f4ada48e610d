"""Tokens per memory parameter: how much text the memory phase trains each bank parameter on (the paper's
gains kept growing up to 312 tokens per parameter; `hmtrain info` prints it, `hmtrain study` plots its
arms' gains against it).

Tokens are the memory phase's sequence positions, train.memory_steps x train.global_batch_size x
data.seq_len (the memory phase's batch is train.global_batch_size whatever the pretraining batch). Every
sequence fetches one row per level, so a level's rows share all the tokens: a level-l row sees tokens / N_l
of them, tokens / (N_l x row parameters) per parameter, which is tokens / that level's bank; the whole
bank's figure is tokens / bank. Sizes are hmtrain/memory/sizes.py's, as `hmtrain info` counts them; the
bank leaves out the generic row (trained on a generic_prob share of the sequences, not routed to).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from hmtrain.config import Config, load_config
from hmtrain.memory import memory_layers, memory_sizes
from hmtrain.memory.kind import memory_kind

RUN_CONFIG = "config.yaml"  # what train writes into its run directory: the config it trained with


def memory_phase_tokens(cfg: Config) -> int:
    return cfg.train.memory_steps * cfg.train.global_batch_size * cfg.data.seq_len


def tokens_per_parameter(cfg: Config) -> dict:
    """The memory phase's tokens over the bank's parameters, the whole bank and per level (the levels with
    memory units). ValueError for a config whose bank is empty."""
    levels = memory_sizes(n_layers=len(memory_layers(cfg)), params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units)
    tokens, bank = memory_phase_tokens(cfg), sum(level.bank_params for level in levels)
    if not bank:
        raise ValueError(f"memory.units={list(cfg.memory.units)}: the bank has no parameters to count tokens for")
    return {"memory_steps": cfg.train.memory_steps, "global_batch": cfg.train.global_batch_size,
            "seq_len": cfg.data.seq_len, "tokens": tokens, "bank_parameters": bank,
            "tokens_per_parameter": tokens / bank,
            "levels": [{"level": level.level + 1, "nodes": level.nodes, "row_parameters": level.fetched_params,
                        "tokens_per_row": tokens / level.nodes, "tokens_per_parameter": tokens / level.bank_params}
                       for level in levels if level.units]}


def run_tokens_per_parameter(run_dir: Path) -> Optional[dict]:
    """`tokens_per_parameter` of the config a training run wrote into its run directory; None for a run that
    trained no bank (train.mode=dense, or no memory units)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found, so {run_dir} is not a trained run directory")
    cfg = load_config(path)
    if cfg.train.mode == "dense" or not any(cfg.memory.units):
        return None
    return {"config": str(path), **tokens_per_parameter(cfg)}


def tokens_line(counted: dict) -> str:
    """One line of `tokens_per_parameter`'s numbers with their arithmetic, as `hmtrain info` prints it."""
    per_level = ", ".join(f"a level-{level['level']} row {level['tokens_per_row']:,.0f} tokens for "
                          f"{level['row_parameters']:,} parameters ({level['tokens_per_parameter']:.3g})"
                          for level in counted["levels"])
    return (f"memory phase: {counted['memory_steps']:,} steps x {counted['global_batch']} sequences x "
            f"{counted['seq_len']} tokens = {counted['tokens']:,} tokens, {counted['tokens_per_parameter']:.3g} per "
            f"bank parameter; {per_level}")
