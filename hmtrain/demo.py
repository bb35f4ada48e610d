"""`hmtrain demo`: the whole pipeline on CPU with a tiny config, ending with the results table.

synth -> prepare -> for each seed: train (anchor, then memory phase), train (dense baseline), eval ->
the table of every seed and, with several seeds, their mean and spread (one seed at this scale is one
sample, not a result), and each seed's figures (seed<S>_long_tail.png, ...) beside results.json. All runs
log to one MLflow store in the demo directory; each evaluation is a child run of its memory run.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from hmtrain.config import load_config
from hmtrain.data.corpus.synth import synthesize
from hmtrain.data.prepare.pipeline import prepare
from hmtrain.eval.evaluate import evaluate, render, to_markdown
from hmtrain.eval.publish import publish
from hmtrain.eval.summary import render_summary, subtree_markdown, subtree_summary, summarize, summary_markdown
from hmtrain.info import print_info
from hmtrain.train.trainer import train


def mlflow_command() -> str:
    """The `mlflow` script of this environment as a user can type it (a venv's is not on PATH unless activated)."""
    script = Path(sys.executable).parent / "mlflow"
    if not script.exists() or shutil.which("mlflow") == str(script):
        return "mlflow"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def print_outputs(console: Console, out: Path, tracking: str, figures: Sequence[Path]) -> None:
    """The demo's last lines: where its results, figures and MLflow runs are."""
    console.print(f"results: {out / 'results.json'} and {out / 'results.md'}")
    console.print("figures: " + ", ".join(str(path) for path in figures), soft_wrap=True)
    console.print(f"MLflow: {mlflow_command()} ui --backend-store-uri {tracking}  (then open http://127.0.0.1:5000); "
                  "each evaluation is a child run of its training run")


def run_demo(out: Path, preset: str = "tiny", overrides: Sequence[str] = (), seeds: Sequence[int] = (0,),
             people: int = 400, documents: int = 3000) -> dict:
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
    console.print(synthesize(corpus, num_people=people, num_documents=documents, seed=data_cfg.data.seed))
    console.rule(f"2/{steps} prepare: embed, fit the tree, route, tokenize, shard")
    prepare(data_cfg, overwrite=True)
    print_info(data_cfg, console)
    per_seed, figures = {}, []
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
        figures += publish(memory_cfg, per_seed[seed], out, prefix=f"seed{seed}_").figures  # and into MLflow
    summary = summarize(per_seed)
    (out / "results.json").write_text(json.dumps({"seeds": per_seed, "summary": summary}, indent=2))
    tables = [summary_markdown(summary), subtree_markdown(subtree_summary(per_seed)),
              *(f"Seed {seed}:\n\n{to_markdown(results)}" for seed, results in per_seed.items())]
    (out / "results.md").write_text("\n".join(tables))
    if len(seeds) > 1:
        render_summary(summary, console)
    print_outputs(console, out, tracking, figures)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return {"seeds": per_seed, "summary": summary}
