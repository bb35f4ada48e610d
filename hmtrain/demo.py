"""`hmtrain demo`: the whole pipeline on CPU with a tiny config, ending with the results table.

synth -> prepare -> train (anchor, then memory phase) -> train (dense baseline) -> eval.
Both runs log to one MLflow store in the demo directory, so one `mlflow ui` shows them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from hmtrain.config import load_config
from hmtrain.data.prepare import prepare
from hmtrain.data.synth import synthesize
from hmtrain.eval.evaluate import evaluate, render, to_markdown, write_results
from hmtrain.info import print_info
from hmtrain.train.trainer import train


def run_demo(out: Path, preset: str = "tiny", overrides: Sequence[str] = ()) -> dict:
    console = Console()
    out = Path(out).resolve()
    started = time.perf_counter()
    corpus = out / "corpus"
    tracking = f"sqlite:///{out / 'mlflow.db'}"
    base = [f"data.documents={corpus / 'documents.jsonl.gz'}", f"data.probes={corpus / 'probes.jsonl'}",
            f"data.prepared={out / 'prepared'}", f"logging.tracking_uri={tracking}"]
    memory_cfg = load_config(preset, [*base, f"train.run_dir={out / 'memory'}", *overrides])
    dense_cfg = load_config(preset, [*base, f"train.run_dir={out / 'dense'}", "train.mode=dense", *overrides])

    console.rule("1/5 synthesize the long-tail facts corpus")
    summary = synthesize(corpus, seed=memory_cfg.data.seed)
    console.print(summary)
    console.rule("2/5 prepare: embed, fit the tree, route, tokenize, shard")
    prepare(memory_cfg, overwrite=True)
    print_info(memory_cfg, console)
    console.rule("3/5 train: anchor pretraining, then the memory phase")
    memory_ckpt = train(memory_cfg)
    console.rule("4/5 train: the dense baseline")
    dense_ckpt = train(dense_cfg)
    console.rule("5/5 evaluate")
    results = evaluate(memory_cfg, memory_ckpt, baseline=dense_ckpt)
    write_results(results, out / "results.json")
    (out / "results.md").write_text(to_markdown(results))
    render(results, console)
    console.print(f"results: {out / 'results.json'} and {out / 'results.md'}")
    console.print(f"MLflow: mlflow ui --backend-store-uri {tracking}  (then open http://127.0.0.1:5000)")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return results
