"""`hmtrain info`: the parameter budget of a config, per level, and what one rank holds, without allocating."""
from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from hmtrain.config import Config
from hmtrain.memory import memory_sizes
from hmtrain.memory.kind import memory_kind
from hmtrain.memory.sizes import rank_footprint
from hmtrain.model import count_parameters, run_model_config
from hmtrain.model.sizes import human

GiB = 2**30


def model_config(cfg: Config):
    """The anchor's config with the vocabulary resolved as training will (tokenizer size, padded)."""
    model = cfg.model
    if model.vocab_size is None:
        vocab = -(-cfg.data.tokenizer_vocab // model.vocab_multiple) * model.vocab_multiple
        model = dataclasses.replace(model, vocab_size=vocab)
    return model


def size_summary(cfg: Config) -> dict:
    model = model_config(cfg)
    levels = memory_sizes(n_layers=model.n_layers, params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units)
    return {
        "anchor": count_parameters(model),
        "dense_baseline": count_parameters(run_model_config(model, "dense", cfg.train.dense_multiplier)),
        "fetched": sum(level.fetched_params for level in levels),
        "bank": sum(level.bank_params for level in levels),
        "levels": levels,
    }


def anchor_bytes_per_rank(params: int, world: int, engine: str, zero_stage: int) -> int:
    """Weights, gradients and AdamW state of the anchor on one rank, bf16 mixed precision."""
    if engine == "fsdp":  # fp32 sharded parameters, gradients and two moments
        return 16 * params // world
    sharded = {1: 12, 2: 14, 3: 16}[zero_stage]  # fp32 master + moments (+ bf16 grads, + bf16 params)
    return (16 - sharded) * params + sharded * params // world


def print_info(cfg: Config, console: Console | None = None, world_size: int = 1) -> dict:
    console = console or Console()
    summary = size_summary(cfg)
    table = Table(title="hmtrain parameter budget")
    for column in ("part", "nodes", "units / layer", "active per sequence", "bank"):
        table.add_column(column, justify="right" if column != "part" else "left")
    table.add_row("anchor", "", "", f"{summary['anchor']:,} ({human(summary['anchor'])})", "")
    for level in summary["levels"]:
        table.add_row(f"memory level {level.level + 1}", f"{level.nodes:,}", str(level.units),
                      f"{level.fetched_params:,}", f"{level.bank_params:,}")
    table.add_row("memory total", "", str(sum(cfg.memory.units)),
                  f"{summary['fetched']:,} ({human(summary['fetched'])})",
                  f"{summary['bank']:,} ({human(summary['bank'])})")
    table.add_row(f"dense baseline (x{cfg.train.dense_multiplier:g})", "", "",
                  f"{summary['dense_baseline']:,} ({human(summary['dense_baseline'])})", "")
    console.print(table)
    summary["per_rank"] = print_rank_memory(cfg, summary, console, world_size)
    return summary


def print_rank_memory(cfg: Config, summary: dict, console: Console, world_size: int) -> dict:
    model = model_config(cfg)
    par, tc = cfg.parallel, cfg.train
    weight_bytes = 2 if cfg.memory.dtype == "bf16" else 4
    bank = rank_footprint(n_layers=model.n_layers, params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units, world_size=world_size,
                          replicate_levels=par.replicate_levels, generic=cfg.memory.generic,
                          weight_bytes=weight_bytes, micro_batch=tc.micro_batch_size,
                          global_batch=tc.global_batch_size)
    anchor = anchor_bytes_per_rank(summary["anchor"], world_size, par.engine, par.zero_stage)
    rows = {
        f"anchor ({par.engine}{'' if par.engine == 'fsdp' else f' ZeRO-{par.zero_stage}'}): "
        "weights, grads, AdamW": anchor,
        f"bank weights ({cfg.memory.dtype}, {par.replicate_levels} top level(s) replicated)": bank.weights,
        "bank fp32 master rows (bf16 banks only; replicated: own rows)": bank.masters,
        "bank optimizer (fp32 moments + step; replicated: own rows)": bank.optimizer,
        "bank step gradients (fp32, at most)": bank.step_grads,
        f"fetched rows + fp32 gradients, micro-batch of {tc.micro_batch_size} (at most)": bank.fetched,
    }
    table = Table(title=f"memory per rank on {world_size} rank(s), before activations")
    table.add_column("what")
    table.add_column("GiB per rank", justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value / GiB:.2f}")
    total = sum(rows.values())
    table.add_row("total", f"{total / GiB:.2f}")
    table.add_row("bank traffic per step, gather placement (expected)", f"{bank.moved_gather / GiB:.2f}")
    table.add_row("bank traffic per step, owner placement (expected)", f"{bank.moved_owner / GiB:.2f}")
    console.print(table)
    return {"total": total, **rows, "moved_gather": bank.moved_gather, "moved_owner": bank.moved_owner}
