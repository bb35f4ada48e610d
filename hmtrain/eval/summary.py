"""Results over several seeds: mean and sample standard deviation per row and column, and per level-1
subtree, from `hmtrain eval --out` files (or the demo's runs).

    python -m hmtrain.eval.summary [--out results.md] runs/eval-s0.json runs/eval-s1.json ...

One seed at CPU scale is one sample: these tables are what results are quoted from.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hmtrain.eval.evaluate import SHORT


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


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
        summary["rows"].append({"name": row["name"], "parameters": row["parameters"],
                                "stats": {column: _stats(v) for column, v in values.items()}})
    return summary


def _cell(stat: dict, digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _stat_cells(row: dict, columns: list[str]) -> list[str]:
    """A summary row's cells: perplexity to 2 decimals, accuracies (in %) to 1."""
    return [_cell(row["stats"][c], 2 if c == "perplexity" else 1) for c in columns]


def _markdown(caption: str, head: list[str], rows: list[list[str]]) -> str:
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(cells) + " |" for cells in rows)]) + "\n"


def summary_markdown(summary: dict) -> str:
    return _markdown(f"Mean ± sample standard deviation over seeds {summary['seeds']} (accuracy in %).",
                     ["model", *summary["columns"]],
                     [[row["name"], *_stat_cells(row, summary["columns"])] for row in summary["rows"]])


def arms_markdown(summaries: dict[str, dict]) -> str:
    """One table of several arms' summaries (arm name -> `summarize` output): a row per arm and model row."""
    columns = list(dict.fromkeys(c for summary in summaries.values() for c in summary["columns"]))
    seeds = sorted({seed for summary in summaries.values() for seed in summary["seeds"]})
    rows = []
    for arm, summary in summaries.items():
        for row in summary["rows"]:
            cells = [_cell(row["stats"][c], 2 if c == "perplexity" else 1) if c in row["stats"] else "-"
                     for c in columns]
            rows.append([arm, row["name"], *cells])
    return _markdown(f"Mean ± sample standard deviation over seeds {seeds} (accuracy in %), per arm.",
                     ["arm", "model", *columns], rows)


def render_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"mean ± std over seeds {summary['seeds']}")
    for column in ("model", *summary["columns"]):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in summary["rows"]:
        table.add_row(SHORT.get(row["name"], row["name"]), *_stat_cells(row, summary["columns"]))
    console.print(table)


def subtree_summary(per_seed: dict[int, dict]) -> dict:
    """Per level-1 subtree: held-out tokens, each row's perplexity over the seeds, and the fetched memory's
    change against the anchor alone (per seed, then averaged), so a reader sees where the memory helps."""
    first = next(iter(per_seed.values()))
    names = [row["name"] for row in first["rows"] if row.get("subtrees")]
    if not names:
        return {"seeds": sorted(per_seed), "names": [], "nodes": []}
    nodes = sorted({int(n) for row in first["rows"] if row.get("subtrees") for n in row["subtrees"]})
    by_name = [{row["name"]: row for row in results["rows"]} for results in per_seed.values()]
    out = []
    for node in nodes:
        key = str(node)
        entry = {"node": node, "tokens": first["rows"][0]["subtrees"][key]["tokens"],
                 "perplexity": {name: _stats([rows[name]["subtrees"][key]["perplexity"] for rows in by_name])
                                for name in names}}
        if {"anchor + fetched memory", "anchor alone"} <= set(names):
            entry["fetched_vs_alone_pct"] = _stats([
                100 * (rows["anchor + fetched memory"]["subtrees"][key]["perplexity"]
                       / rows["anchor alone"]["subtrees"][key]["perplexity"] - 1) for rows in by_name])
        out.append(entry)
    return {"seeds": sorted(per_seed), "names": names, "nodes": out}


# a gain's key -> the row the fetched memory's perplexity is compared with
GAINS = {"vs_anchor": "anchor alone", "vs_dense": "dense baseline"}


def perplexity_gains(per_seed: dict[int, dict]) -> dict:
    """Per comparison every seed's results hold both rows for (GAINS): the fetched memory's held-out
    perplexity gain, 100 x (1 - ppl_fetched / ppl_other) per seed (positive: the memory has the lower
    perplexity), then its mean, sample std, min and max over the seeds."""
    by_seed = [{row["name"]: row["perplexity"] for row in results["rows"]} for results in per_seed.values()]
    fetched = "anchor + fetched memory"
    return {key: _stats([100 * (1 - rows[fetched] / rows[other]) for rows in by_seed])
            for key, other in GAINS.items() if all(fetched in rows and other in rows for rows in by_seed)}


def subtree_markdown(summary: dict) -> str:
    if not summary["nodes"]:
        return ""
    with_change = "fetched_vs_alone_pct" in summary["nodes"][0]
    rows = []
    for entry in summary["nodes"]:
        perplexities = (_cell(entry["perplexity"][name], 2) for name in summary["names"])
        cells = [str(entry["node"]), f"{entry['tokens']:,}", *perplexities]
        if with_change:
            change = entry["fetched_vs_alone_pct"]
            cells.append(f"{change['mean']:+.1f}% ± {change['std']:.1f}")
        rows.append(cells)
    return _markdown(f"Held-out perplexity per level-1 subtree, mean ± sample std over seeds {summary['seeds']}; the "
                     "last column is the fetched memory's perplexity change against the anchor alone, per seed.",
                     ["subtree", "held-out tokens", *summary["names"], *(["fetched vs alone"] if with_change else [])],
                     rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmtrain.eval.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="`hmtrain eval --out` files, one per seed")
    parser.add_argument("--out", type=Path, help="also write the tables as markdown here")
    args = parser.parse_args(argv)
    per_seed = {}
    for i, path in enumerate(args.results):
        try:
            per_seed[i] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"{path}: not a readable results file ({exc})")
    names = [[row["name"] for row in r["rows"]] for r in per_seed.values()]
    if any(n != names[0] for n in names):
        parser.error("the results files do not have the same rows: " + "; ".join(map(str, names)))
    routings = {r.get("probe_routing", "question") for r in per_seed.values()}  # files from before the key: question
    if len(routings) > 1:
        parser.error(f"the results files route their probes differently ({', '.join(sorted(routings))}): "
                     "summarize one eval.probe_routing at a time")
    summary, subtrees = summarize(per_seed), subtree_markdown(subtree_summary(per_seed))
    render_summary(summary, Console())
    print(subtrees)
    text = summary_markdown(summary) + "\n" + subtrees
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
