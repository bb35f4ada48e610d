"""The eval's pictures, as PNG files: one function per figure, each returning the path it wrote.

    long_tail           probe accuracy by frequency bucket, one line per model row (the paper's long-tail plot)
    subtree_perplexity  held-out perplexity per level-1 subtree, one bar per model row
    tree_balance        tokens and documents per tree node, per level, from the prepared data's manifest
    arms_overview       a study's arms: perplexity and probe accuracy per arm, error bars over seeds
    arms_long_tail      a study's arms: probe accuracy per frequency bucket, a panel per model row
    gain_vs_tokens_per_param  a study's arms: the fetched memory's perplexity gain against the memory phase's
                        tokens per memory parameter (log scale)

matplotlib's object API (`Figure`, not pyplot) draws them: no global figure state and no display; a PNG
is rendered by the Agg canvas whatever backend the environment names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from hmtrain.eval.evaluate import SHORT
from hmtrain.eval.summary import GAINS

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
    routed = f", routed by {results['probe_routing']}" if "probe_routing" in results else ""
    axes.set_title(f"long-tail probes, step {results['step']}{routed}")
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


def _row_names(summaries: dict[str, dict]) -> list[str]:
    return list(dict.fromkeys(row["name"] for summary in summaries.values() for row in summary["rows"]))


def _stat(summary: dict, name: str, column: str) -> tuple[float, float]:
    """(mean, std) of a model row's column in an arm's summary; (nan, 0) when the arm lacks it."""
    for row in summary["rows"]:
        if row["name"] == name and column in row["stats"]:
            return row["stats"][column]["mean"], row["stats"][column]["std"]
    return float("nan"), 0.0


def arms_overview(summaries: dict[str, dict], path: Path) -> Path:
    """Held-out perplexity and (with probes) accuracy over all probes, per arm (arm name -> `summarize`
    output): a group of bars per arm, a bar per model row, error bars one sample std over the seeds."""
    arms, names = list(summaries), _row_names(summaries)
    columns = [("perplexity", "held-out perplexity")]
    if any("acc all" in summary["columns"] for summary in summaries.values()):
        columns.append(("acc all", "probe accuracy, all probes (%)"))
    width = 0.8 / len(names)
    figure = Figure(figsize=(max(5.0, 1.2 * len(arms) + 2) * len(columns), 4.2), layout="constrained")
    for panel, (column, label) in zip(figure.subplots(1, len(columns), squeeze=False)[0], columns):
        for index, name in enumerate(names):
            stats = [_stat(summaries[arm], name, column) for arm in arms]
            xs = [i + (index - (len(names) - 1) / 2) * width for i in range(len(arms))]
            panel.bar(xs, [m for m, _ in stats], width=width, yerr=[s for _, s in stats], capsize=3,
                      label=SHORT.get(name, name))
        panel.set_xticks(range(len(arms)), arms)
        panel.set_ylabel(label)
        panel.grid(axis="y", alpha=0.3)
    seeds = sorted({seed for summary in summaries.values() for seed in summary["seeds"]})
    figure.suptitle(f"per arm, mean ± sample std over seeds {seeds}")
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(names),
                  fontsize="small")  # below the panels: inside one it would cover bars
    return _save(figure, path)


def arms_long_tail(summaries: dict[str, dict], path: Path) -> Path:
    """Probe accuracy (%) per frequency bucket, rarest first: a panel per model row, a line per arm, error
    bars one sample std over the seeds."""
    buckets = list(dict.fromkeys(c for summary in summaries.values() for c in summary["columns"]
                                 if c.startswith("acc ") and c != "acc all"))
    if not buckets:
        raise ValueError("the study's results hold no probe accuracy (no data.probes): nothing to draw")
    names = _row_names(summaries)
    figure = Figure(figsize=(4.2 * len(names) + 1, 4.2), layout="constrained")
    panels = figure.subplots(1, len(names), squeeze=False, sharey=True)[0]
    for panel, name in zip(panels, names):
        for arm, summary in summaries.items():
            stats = [_stat(summary, name, column) for column in buckets]
            panel.errorbar(range(len(buckets)), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                           capsize=3, label=arm)
        panel.set_xticks(range(len(buckets)), [c.removeprefix("acc ") for c in buckets])
        panel.set_title(SHORT.get(name, name), fontsize="medium")
        panel.set_xlabel("documents per person")
        panel.grid(alpha=0.3)
    panels[0].set_ylabel("probe accuracy (%)")
    panels[0].legend(fontsize="small")
    figure.suptitle("long-tail probes per arm, mean ± sample std over seeds")
    return _save(figure, path)


def gain_vs_tokens_per_param(points: dict[str, dict], path: Path) -> Path:
    """Per arm (arm name -> {"tokens_per_parameter": x, "gains": {key: {"mean", "std"}}}, hmtrain/study/tokens.py):
    the fetched memory's perplexity gain (%) over each row it was compared with, against the memory phase's
    tokens per bank parameter; a line per comparison through the arms in x order, error bars one sample std
    over the seeds. Above the dashed zero line the memory wins."""
    arms = sorted(points, key=lambda arm: points[arm]["tokens_per_parameter"])
    keys = [key for key in GAINS if any(key in points[arm]["gains"] for arm in arms)]
    if not keys:
        raise ValueError("the study's results hold no perplexity gain (no fetched memory row): nothing to draw")
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for key in keys:
        shown = [arm for arm in arms if key in points[arm]["gains"]]
        xs = [points[arm]["tokens_per_parameter"] for arm in shown]
        stats = [points[arm]["gains"][key] for arm in shown]
        axes.errorbar(xs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3,
                      label=f"fetched memory over the {GAINS[key]}")
    axes.axhline(0, color="black", linestyle="--", linewidth=1)
    axes.set_xscale("log")
    ticks: dict[float, list[str]] = {}  # a tick per count, its arms named below it (equal banks share one)
    for arm in arms:
        ticks.setdefault(points[arm]["tokens_per_parameter"], []).append(arm)
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticks(list(ticks), [f"{x:.3g}\n" + "\n".join(names) for x, names in ticks.items()], fontsize="small")
    axes.set_xlabel("memory-phase tokens per memory parameter (whole bank)")
    axes.set_ylabel("held-out perplexity gain (%)")
    axes.set_title("gain vs tokens per parameter, mean ± sample std over seeds")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


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
