"""`hmtrain bench placement`: step time of the bank's placements at several world sizes, in one run.

    hmtrain bench placement [--ranks 1 2 4] [--steps N] [--out DIR] [key=value ...]
    python -m hmtrain.bench.placement [key=value ...] [--ranks 1 2 4] [--steps N] [--out DIR]

For each world size and placement it runs the real trainer (`hmtrain train` under torchrun, memory
phase only) on a small synthetic corpus prepared once, and reads the per-step times it logs. Rows:

- `gather`: every level sharded by row; ranks fetch the rows their batch needs (all-to-all both ways);
- `owner`: sequences go to the rank that owns their level-1 subtree; deep levels stay local;
- `replicated`: every level on every rank, optimizer state sharded (ZeRO-1, hmtrain/memory/zero.py):
  gradients reduce-scattered at the end of the step, updated rows all-gathered.

Ratios are against `gather` at the same world size, and against the 1-rank run of the same
placement. The last column is the bank's point-to-point traffic per step (rows fetched from other
ranks plus their gradients sent back, from the trainer's metrics; a replicated level's reduce-scatter
and all-gather are not in it): bytes, so unlike the times it does not depend on the machine's load. On a CPU the ranks
share cores: a wider world only shows communication overhead, not speed-up (say so when quoting
numbers). On a GPU machine pass `train.device=cuda`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from hmtrain.config import split_global_batch

PLACEMENTS = {"gather": ["parallel.placement=gather", "parallel.replicate_levels=0"],
              "owner": ["parallel.placement=owner", "parallel.replicate_levels=0"],
              "replicated": ["parallel.placement=gather", "parallel.replicate_levels=2"]}
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32", "model.ffn_hidden=192",
         "memory.units=[64,32]", "tree.branching=[4,4]", "data.seq_len=128", "data.embedder=hashing",
         "data.tokenizer=byte", "data.shard_samples=64", "data.heldout_fraction=0.05"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd: Path, timeout: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")


def prepare(out: Path, overrides: Sequence[str]) -> list[str]:
    corpus, prepared = out / "corpus", out / "prepared"
    data = [*MODEL, f"data.documents={corpus / 'documents.jsonl.gz'}", f"data.prepared={prepared}", *overrides]
    if not (prepared / "manifest.json").is_file():
        cli = [sys.executable, "-m", "hmtrain.cli"]
        _run([*cli, "data", "synth", "--out", str(corpus), "--people", "200", "--documents", "1500"], out, 600)
        _run([*cli, "data", "prepare", "--config", "tiny", *data, "--overwrite"], out, 1200)
    return data


def step_times(out: Path, data: list[str], ranks: int, placement: str, steps: int,
               batch: int) -> tuple[list[float], list[float]]:
    """Per logged step after start-up: (seconds, bank bytes sent point to point: rows fetched plus
    gradients returned, summed over tables and ranks)."""
    run_dir = out / f"run-{placement}-{ranks}"
    train = ["-m", "hmtrain.cli", "train", "--config", "tiny", *data, *PLACEMENTS[placement],
             "train.pretrain_steps=0", f"train.memory_steps={steps}", f"train.global_batch_size={batch}",
             f"train.micro_batch_size={batch // ranks // 2}", "train.log_every=1",
             f"train.checkpoint_every={steps}", "logging.mlflow=false", "train.progress=false",
             f"train.run_dir={run_dir}"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if ranks == 1:
        _run([sys.executable, *train], out, 1800)
    else:
        _run(["timeout", "1800", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
              "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *train], out, 1900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]  # start-up
    moved = [sum(v for k, v in r.items() if k.endswith(("/bytes_fetched", "/bytes_returned"))) for r in rows]
    return [r["step_s"] for r in rows], moved


def run(out: Path, ranks: Sequence[int], steps: int, batch: int, overrides: Sequence[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out, overrides)
    results = []
    for world in ranks:
        for placement in PLACEMENTS:
            times, moved = step_times(out, data, world, placement, steps, batch)
            results.append({"ranks": world, "placement": placement, "step_s": statistics.median(times),
                            "spread_s": statistics.pstdev(times), "moved_mb": statistics.fmean(moved) / 2**20})
    return results


def render(results: list[dict]) -> str:
    by = {(r["ranks"], r["placement"]): r["step_s"] for r in results}
    lines = ["| ranks | placement | median step (s) | std (s) | vs gather, same ranks | vs 1 rank, same placement "
             "| rows + grads sent (MiB/step) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base, one = by[(r["ranks"], "gather")], by.get((1, r["placement"]))
        versus_one = f"{r['step_s'] / one:.2f}x" if one else "-"
        lines.append(f"| {r['ranks']} | {r['placement']} | {r['step_s']:.3f} | {r['spread_s']:.3f} | "
                     f"{r['step_s'] / base:.2f}x | {versus_one} | {r['moved_mb']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hmtrain bench placement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-placement"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for ranks in args.ranks:
        split_global_batch(args.global_batch, ranks, micro_batches=2, name=f"--ranks {ranks} --global-batch")
    results = run(args.out, args.ranks, args.steps, args.global_batch, args.overrides)
    table = render(results)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
