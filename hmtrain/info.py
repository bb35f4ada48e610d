"""`hmtrain info`: the parameter budget of a config, per level, without allocating anything."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from hmtrain.config import Config
from hmtrain.memory import memory_sizes
from hmtrain.model import count_parameters, run_model_config


def human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def size_summary(cfg: Config) -> dict:
    levels = memory_sizes(n_layers=cfg.model.n_layers, d_model=cfg.model.d_model,
                          branching=cfg.tree.branching, units=cfg.memory.units)
    return {
        "anchor": count_parameters(cfg.model),
        "dense_baseline": count_parameters(run_model_config(cfg.model, "dense", cfg.train.dense_multiplier)),
        "fetched": sum(level.fetched_params for level in levels),
        "bank": sum(level.bank_params for level in levels),
        "levels": levels,
    }


def print_info(cfg: Config, console: Console | None = None) -> dict:
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
    return summary
