"""`hmtrain eval`: the paper's comparison table for a trained memory model (and a dense baseline).

Rows: anchor + fetched memory, anchor + generic memory, anchor alone, dense baseline.
Columns: active parameters, held-out perplexity (memory routed by each document's path),
probe accuracy per frequency bucket (memory routed as `eval.probe_routing` says: from the question alone,
as the paper does, from the prompt, or by the oracle path of the person's training documents), and how
often that routing reaches the oracle's node at each level.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from hmtrain.checkpoint.resume import check_data_fingerprints
from hmtrain.config import Config
from hmtrain.data.corpus.probes import bucket_counts, load_probes
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.loader import sequential_batches
from hmtrain.data.routing.questions import route_probes
from hmtrain.eval.loading import Trained, load_trained
from hmtrain.eval.probes import probe_accuracy, routing_agreement
from hmtrain.eval.scoring import heldout_perplexity
from hmtrain.model.sizes import human
from hmtrain.util.files import write_text

ROWS = (("anchor + fetched memory", "fetched"), ("anchor + generic memory", "generic"), ("anchor alone", "none"))
SHORT = {"anchor + fetched memory": "anchor+memory", "anchor + generic memory": "anchor+generic",
         "anchor alone": "anchor", "dense baseline": "dense"}


def _heldout_batches(data: PreparedData, batch_size: int):
    return sequential_batches(data, "heldout", batch_size)


def _heldout_count(data: PreparedData, max_sequences: int) -> int:
    count = len(data.sequences("heldout"))
    return min(count, max_sequences) if max_sequences > 0 else count


def evaluate(cfg: Config, checkpoint: str | Path, baseline: Optional[str | Path] = None,
             device: Optional[str] = None, progress: bool = True) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = PreparedData.open(cfg.data.prepared, verify="checksums" if cfg.data.verify_checksums else "sizes")
    trained = load_trained(checkpoint, device)
    data.check_compatible(trained.cfg)
    check_data_fingerprints(trained.path, trained.record, data.fingerprints(), data.root)
    models: list[tuple[str, Trained, str]] = []
    for name, variant in ROWS:
        if variant == "none" or (trained.bank is not None and (variant != "generic" or trained.bank.has_generic)):
            models.append((name, trained, variant))
    if baseline is not None:
        dense = load_trained(baseline, device)
        if dense.cfg.model.family != "lm" or dense.cfg.train.mode != "dense":
            raise ValueError(f"--baseline {baseline}: checkpoint {dense.path} is a {dense.cfg.train.mode} run "
                             f"(model.family={dense.cfg.model.family}), not a dense baseline; train one with "
                             "train.mode=dense")
        data.check_compatible(dense.cfg)
        check_data_fingerprints(dense.path, dense.record, data.fingerprints(), data.root)
        models.append(("dense baseline", dense, "none"))

    probe_set = None
    if cfg.data.probes:
        probes = load_probes(cfg.data.probes, limit=cfg.eval.max_probes)
        probe_set = route_probes(data, probes, routing=str(cfg.eval.probe_routing), progress=progress)

    fetched = trained.bank.fetched_parameters() if trained.bank is not None else 0
    results = {"checkpoint": str(trained.path), "step": trained.step, "rows": []}
    for name, run, variant in models:
        row = {"name": name, "variant": variant, "checkpoint": str(run.path),
               "parameters": run.parameters + (fetched if variant != "none" else 0)}
        batches = _heldout_batches(data, cfg.eval.batch_size)
        if progress:  # one bar per stage: a paper-size eval runs for many minutes
            batches = tqdm(batches, desc=f"held-out ppl, {name}", unit="batch", leave=False, dynamic_ncols=True,
                           total=-(-_heldout_count(data, cfg.eval.max_sequences) // cfg.eval.batch_size))
        row.update(heldout_perplexity(run.model, run.bank, batches, variant, device,
                                      max_sequences=cfg.eval.max_sequences))
        if probe_set is not None:
            row["probe_accuracy"] = probe_accuracy(run.model, run.bank, variant, probe_set, data, device,
                                                   batch_size=cfg.eval.probe_batch_size,
                                                   progress=f"probes, {name}" if progress else "")
        results["rows"].append(row)
    if probe_set is not None:
        results["probes"] = {"count": len(probe_set.probes), "per_bucket": bucket_counts(probe_set.probes)}
        results["probe_routing"] = probe_set.routing
        results["routing_agreement"] = routing_agreement(data, probe_set)
    return results


def render(results: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    buckets = list(results["rows"][0].get("probe_accuracy", {}))
    table = Table(title=f"hmtrain eval, step {results['step']}: held-out perplexity and probe accuracy "
                        "by documents per person")
    for column in ("model", "params", "ppl", *buckets):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in results["rows"]:
        accuracy = [f"{100 * row['probe_accuracy'][b]:.1f}" for b in buckets]
        table.add_row(SHORT.get(row["name"], row["name"]), human(row["parameters"]), f"{row['perplexity']:.2f}",
                      *accuracy)
    console.print(table)
    per_bucket = results.get("probes", {}).get("per_bucket", {})
    if per_bucket:
        console.print("probes per bucket: " + ", ".join(f"{b}: {n}" for b, n in per_bucket.items()))
    if "probe_routing" in results:
        console.print(f"probes routed by: {routing_phrase(results)}")
    if results.get("routing_agreement"):
        agreement = ", ".join(f"{k} {100 * v:.1f}%" for k, v in results["routing_agreement"].items())
        console.print(f"routing agreement (probe's node = the oracle's, per level): {agreement}")
    subtrees = subtree_table(results)
    if subtrees:
        table = Table(title="held-out perplexity per level-1 subtree (memory fetched from each sequence's path)")
        for column in subtrees[0]:
            table.add_column(column, justify="right")
        for row in subtrees[1:]:
            table.add_row(*row)
        console.print(table)
    console.print(f"checkpoint: {results['checkpoint']}")


def routing_phrase(results: dict) -> str:
    """How the results' probes were routed (`probe_routing`), in words."""
    routing = results["probe_routing"]
    return {"question": "question (the question's embedding, as the paper)",
            "context": "context (the prompt the choices are scored after)",
            "oracle": "oracle (the path of most of the person's training documents)"}.get(routing, routing)


def subtree_table(results: dict) -> list[list[str]]:
    """[header, rows...]: one row per level-1 subtree (tokens, then each model's perplexity); [] if none."""
    rows = [r for r in results["rows"] if r.get("subtrees")]
    if not rows:
        return []
    nodes = sorted({int(n) for r in rows for n in r["subtrees"]})
    out = [["subtree", "tokens", *(SHORT.get(r["name"], r["name"]) for r in rows)]]
    for node in nodes:
        cells = [r["subtrees"].get(str(node)) for r in rows]
        tokens = next(c["tokens"] for c in cells if c)
        out.append([str(node), str(tokens), *(f"{c['perplexity']:.2f}" if c else "-" for c in cells)])
    return out


def to_markdown(results: dict) -> str:
    buckets = list(results["rows"][0].get("probe_accuracy", {}))
    head = ["model", "params (active)", "held-out ppl"] + [f"acc {b}" for b in buckets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        cells = [row["name"], human(row["parameters"]), f"{row['perplexity']:.2f}"]
        cells += [f"{100 * row['probe_accuracy'][b]:.1f}%" for b in buckets]
        lines.append("| " + " | ".join(cells) + " |")
    if "probe_routing" in results:
        lines += ["", f"Probes routed by {routing_phrase(results)}."]
    if results.get("routing_agreement"):
        agreement = ", ".join(f"{k} {100 * v:.1f}%" for k, v in results["routing_agreement"].items())
        lines += ["", f"Routing agreement with the oracle path, per level: {agreement}."]
    subtrees = subtree_table(results)
    if subtrees:
        lines += ["", "Held-out perplexity per level-1 subtree:", "",
                  "| " + " | ".join(subtrees[0]) + " |", "|" + "---|" * len(subtrees[0])]
        lines += ["| " + " | ".join(row) + " |" for row in subtrees[1:]]
    return "\n".join(lines) + "\n"


def check_output_path(path: Path) -> None:
    """Fail before evaluating when the results could not be written to `path`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--out {path}: is a directory; give a file name")
    for parent in path.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise NotADirectoryError(f"--out {path}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {path}: {parent} is not writable")
        return


def write_results(results: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2))
