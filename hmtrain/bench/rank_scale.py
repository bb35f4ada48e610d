"""Per-rank bank state and traffic of the paper presets at 8 to 512 ranks, from `hmtrain info`'s arithmetic.

    hmtrain bench rank_scale [--presets paper-160m ...] [--ranks 8 64 512] [--placement owner]

For each preset and world size: owner placement's groups, the bank state the busiest rank holds (weights,
fp32 masters and moments), the whole bank's bytes over W (the even split a placement can approach), and the
bytes one rank sends and receives per step (expected): owner placement's both with the loader's routing inside
a group (each rank first the sequences whose rows it stores, hmtrain/data/loading/route.py) and with the even cut
in stream order that preceded it. Nothing runs: it is `hmtrain info` for every cell, in
one table; tests/dist/ checks the arithmetic's layouts against multi-rank CPU runs.
"""
from __future__ import annotations

import argparse
import io

from rich.console import Console
from rich.table import Table

GiB = 2**30
STATE = ("bank weights", "bank fp32 master", "bank optimizer")  # the rows of info's per-rank table they sum


def cell(preset: str, world_size: int, placement: str) -> dict:
    from hmtrain.config import load_config
    from hmtrain.info import bank_footprint, print_info

    cfg = load_config(preset, [f"parallel.placement={placement}"])
    summary = print_info(cfg, Console(file=io.StringIO()), world_size=world_size)
    per_rank = summary["per_rank"]
    state = sum(value for key, value in per_rank.items() if key.startswith(STATE))
    moved = per_rank["moved_owner" if placement == "owner" else "moved_gather"]
    return {"groups": per_rank["owner_groups"], "state": state, "even": summary["checkpoint"]["bank"] / world_size,
            "moved": moved, "moved_even": bank_footprint(cfg, world_size, routed=False).moved_owner}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench rank_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["paper-160m", "paper-410m", "paper-1.4b"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64, 512])
    parser.add_argument("--placement", choices=["owner", "gather"], default="owner")
    args = parser.parse_args(argv)
    table = Table(title=f"bank per rank, {args.placement} placement (hmtrain info's arithmetic)")
    for name in ("preset", "ranks", "groups x ranks", "bank state GiB/rank", "bank / W GiB", "ratio",
                 "traffic GiB/step/rank", *(["without routing"] if args.placement == "owner" else [])):
        table.add_column(name, justify="left" if name == "preset" else "right")
    for preset in args.presets:
        for world in args.ranks:
            c = cell(preset, world, args.placement)
            table.add_row(preset, str(world), f"{c['groups'][0]} x {c['groups'][1]}", f"{c['state'] / GiB:.2f}",
                          f"{c['even'] / GiB:.2f}", f"{c['state'] / c['even']:.2f}x", f"{c['moved'] / GiB:.2f}",
                          *([f"{c['moved_even'] / GiB:.2f}"] if args.placement == "owner" else []))
    Console().print(table)


if __name__ == "__main__":
    main()
