"""The eval's pictures, as PNG files: one function per figure, each returning the path it wrote.

    long_tail           probe accuracy by frequency bucket, one line per model row (the paper's long-tail plot)
    subtree_perplexity  held-out perplexity per level-1 subtree, one bar per model row
    tree_balance        tokens and documents per tree node, per level, from the prepared data's manifest

matplotlib's object API (`Figure`, not pyplot) draws them: no global figure state and no display; a PNG
is rendered by the Agg canvas whatever backend the environment names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hmtrain.eval.evaluate import SHORT

DPI = 110
MAX_BARS = 64  # a level with more nodes is drawn as its nodes' counts sorted, not one bar per node


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _label(row: dict) -> str:
    return SHORT.get(row["name"], row["name"])


def long_tail(results: dict, path: Path) -> Path:
    """Accuracy (%) per frequency bucket, rarest first; "all" is in the legend, not on the axis."""
    rows = [r for r in results["rows"] if r.get("probe_accuracy")]
    if not rows:
        raise ValueError("the results hold no probe accuracy (no data.probes): nothing to draw")
    buckets = [b for b in rows[0]["probe_accuracy"] if b != "all"]
    counts = results.get("probes", {}).get("per_bucket", {})
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for row in rows:
        accuracy = row["probe_accuracy"]
        overall = f" (all {100 * accuracy['all']:.1f}%)" if "all" in accuracy else ""
        axes.plot(range(len(buckets)), [100 * accuracy[b] for b in buckets], marker="o", label=_label(row) + overall)
    axes.set_xticks(range(len(buckets)), [f"{b}\nn={counts[b]}" if b in counts else b for b in buckets])
    axes.set_xlabel("documents per person in the training data (probes per bucket)")
    axes.set_ylabel("probe accuracy (%)")
    axes.set_title(f"long-tail probes, step {results['step']}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def subtree_perplexity(results: dict, path: Path) -> Path:
    """Held-out perplexity per level-1 subtree: a group of bars per subtree, one bar per model row."""
    rows = [r for r in results["rows"] if r.get("subtrees")]
    if not rows:
        raise ValueError("the results hold no per-subtree perplexity: nothing to draw")
    nodes = sorted({int(n) for r in rows for n in r["subtrees"]})
    width = 0.8 / len(rows)
    figure = Figure(figsize=(max(6.0, 0.6 * len(nodes) * len(rows) / 2 + 2), 4.2), layout="constrained")
    axes = figure.add_subplot()
    for index, row in enumerate(rows):
        xs = [i + (index - (len(rows) - 1) / 2) * width for i, node in enumerate(nodes) if str(node) in row["subtrees"]]
        ys = [row["subtrees"][str(node)]["perplexity"] for node in nodes if str(node) in row["subtrees"]]
        axes.bar(xs, ys, width=width, label=_label(row))
    tokens = {int(n): c["tokens"] for r in rows for n, c in r["subtrees"].items()}
    axes.set_xticks(range(len(nodes)), [f"{node}\n{tokens[node]:,} tok" for node in nodes], fontsize="small")
    axes.set_xlabel("level-1 subtree (held-out tokens)")
    axes.set_ylabel("held-out perplexity")
    axes.set_title(f"perplexity per level-1 subtree, step {results['step']}")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def tree_balance(manifest: dict, path: Path) -> Path:
    """Per level, tokens (top) and documents (bottom) per node of the training data; the dashed line is the
    mean, a perfectly balanced level; max/mean in each title says how far from it the level is."""
    if "node_tokens" not in manifest or "node_documents" not in manifest:
        raise ValueError("the manifest has no node_tokens / node_documents (prepared by an older hmtrain): "
                         "nothing to draw")
    levels = len(manifest["branching"])
    figure = Figure(figsize=(4 * levels + 1, 6), layout="constrained")
    grid = figure.subplots(2, levels, squeeze=False)
    for row, (key, what) in enumerate((("node_tokens", "tokens"), ("node_documents", "documents"))):
        for level, counts in enumerate(manifest[key]):
            _balance_panel(grid[row][level], counts, level + 1, what)
    figure.suptitle("tree balance: training data per node")
    return _save(figure, path)


def _balance_panel(axes, counts: list[int], level: int, what: str) -> None:
    mean = sum(counts) / len(counts)
    if len(counts) <= MAX_BARS:
        axes.bar(range(len(counts)), counts, width=0.85)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel(f"level-{level} node")
    else:
        axes.step(range(len(counts)), sorted(counts, reverse=True), where="mid")
        axes.set_xlabel(f"level-{level} nodes, sorted by {what}")
    axes.axhline(mean, color="black", linestyle="--", linewidth=1)
    spread = f"max/mean {max(counts) / mean:.2f}" if mean else "empty"
    axes.set_title(f"level {level}: {len(counts):,} nodes, {spread}", fontsize="medium")
    axes.set_ylabel(what)


def eval_figures(results: dict, manifest: Optional[dict], directory: Path, prefix: str = "") -> list[Path]:
    """Every figure the results (and the manifest) hold data for, as `<directory>/<prefix><name>.png`."""
    directory = Path(directory)
    written = []
    if any(r.get("probe_accuracy") for r in results["rows"]):
        written.append(long_tail(results, directory / f"{prefix}long_tail.png"))
    if any(r.get("subtrees") for r in results["rows"]):
        written.append(subtree_perplexity(results, directory / f"{prefix}subtree_perplexity.png"))
    if manifest is not None and "node_tokens" in manifest and "node_documents" in manifest:
        written.append(tree_balance(manifest, directory / f"{prefix}tree_balance.png"))
    return written
