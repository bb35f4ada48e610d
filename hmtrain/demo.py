"""`hmtrain demo`: the whole pipeline on CPU with a tiny config, ending with the results table.

synth -> prepare -> for each seed: train (anchor, then memory phase), train (dense baseline), eval ->
the table of every seed and, with several seeds, their mean and spread (one seed at this scale is one
sample, not a result). All runs log to one MLflow store in the demo directory.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from hmtrain.config import load_config
from hmtrain.data.prepare import prepare
from hmtrain.data.synth import synthesize
from hmtrain.eval.evaluate import SHORT, evaluate, render, to_markdown
from hmtrain.info import print_info
from hmtrain.train.trainer import train


def run_demo(out: Path, preset: str = "tiny", overrides: Sequence[str] = (), seeds: Sequence[int] = (0,)) -> dict:
    console = Console()
    out = Path(out).resolve()
    started = time.perf_counter()
    corpus = out / "corpus"
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    base = [f"data.documents={corpus / 'documents.jsonl.gz'}", f"data.probes={corpus / 'probes.jsonl'}",
            f"data.prepared={out / 'prepared'}", f"logging.tracking_uri={tracking}", *overrides]
    data_cfg = load_config(preset, base)
    steps = 2 + 3 * len(seeds)

    console.rule(f"1/{steps} synthesize the long-tail facts corpus")
    console.print(synthesize(corpus, seed=data_cfg.data.seed))
    console.rule(f"2/{steps} prepare: embed, fit the tree, route, tokenize, shard")
    prepare(data_cfg, overwrite=True)
    print_info(data_cfg, console)
    per_seed = {}
    for i, seed in enumerate(seeds):
        run = out / f"seed{seed}"
        seeded = [*base, f"train.seed={seed}"]
        memory_cfg = load_config(preset, [*seeded, f"train.run_dir={run / 'memory'}"])
        dense_cfg = load_config(preset, [*seeded, f"train.run_dir={run / 'dense'}", "train.mode=dense"])
        console.rule(f"{3 + 3 * i}/{steps} seed {seed}: anchor pretraining, then the memory phase")
        memory_ckpt = train(memory_cfg)
        console.rule(f"{4 + 3 * i}/{steps} seed {seed}: the dense baseline")
        dense_ckpt = train(dense_cfg)
        console.rule(f"{5 + 3 * i}/{steps} seed {seed}: evaluate")
        per_seed[seed] = evaluate(memory_cfg, memory_ckpt, baseline=dense_ckpt)
        render(per_seed[seed], console)
    summary = summarize(per_seed)
    (out / "results.json").write_text(json.dumps({"seeds": per_seed, "summary": summary}, indent=2))
    (out / "results.md").write_text(summary_markdown(summary) + "\n" + "".join(
        f"\nSeed {seed}:\n\n{to_markdown(results)}" for seed, results in per_seed.items()))
    if len(seeds) > 1:
        render_summary(summary, console)
    console.print(f"results: {out / 'results.json'} and {out / 'results.md'}")
    console.print(f"MLflow: mlflow ui --backend-store-uri {tracking}  (then open http://127.0.0.1:5000)")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return {"seeds": per_seed, "summary": summary}


def summarize(per_seed: dict[int, dict]) -> dict:
    """Per row and column: mean, sample standard deviation, min and max over the seeds."""
    first = next(iter(per_seed.values()))
    columns = ["perplexity", *[f"acc {b}" for b in first["rows"][0].get("probe_accuracy", {})]]
    summary = {"seeds": sorted(per_seed), "columns": columns, "rows": []}
    for index, row in enumerate(first["rows"]):
        values = {column: [] for column in columns}
        for results in per_seed.values():
            other = results["rows"][index]
            values["perplexity"].append(other["perplexity"])
            for bucket, accuracy in other.get("probe_accuracy", {}).items():
                values[f"acc {bucket}"].append(100 * accuracy)
        summary["rows"].append({"name": row["name"], "parameters": row["parameters"], "stats": {
            column: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                     "min": min(v), "max": max(v)} for column, v in values.items()}})
    return summary


def _cell(stat: dict, digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def summary_markdown(summary: dict) -> str:
    head = ["model", *summary["columns"]]
    lines = [f"Mean ± sample standard deviation over seeds {summary['seeds']} (accuracy in %).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [row["name"]] + [_cell(row["stats"][c], 2 if c == "perplexity" else 1) for c in summary["columns"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"mean ± std over seeds {summary['seeds']}")
    for column in ("model", *summary["columns"]):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in summary["rows"]:
        table.add_row(SHORT.get(row["name"], row["name"]),
                      *[_cell(row["stats"][c], 2 if c == "perplexity" else 1) for c in summary["columns"]])
    console.print(table)
