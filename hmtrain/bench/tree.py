"""Fit time and memory of the paper's tree (4 levels x 16: 16 / 256 / 4,096 / 65,536 nodes) on a
synthetic sample of random unit vectors (384-d, MiniLM's size), one size per child process.

    python -m hmtrain.bench.tree --sizes 62500 250000 1000000

Each size runs in a fresh process, so its peak RSS (wait4's ru_maxrss) is its own; the table gives
wall and CPU time of the fit and of routing the whole sample, and the peak RSS beside the sample's
own size.
Random unit vectors have no cluster structure, so this measures cost, not quality.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(n: int, dim: int, branching: list[int], steps: int, subsample: int) -> None:
    import torch

    from hmtrain.data.routing.tree import fit_tree

    torch.manual_seed(0)
    x = torch.randn(n, dim)
    x /= x.norm(dim=1, keepdim=True)  # in place: the sample is the only n x dim tensor held
    t0, c0 = time.perf_counter(), time.process_time()
    tree = fit_tree(x, branching, steps=steps, subsample=subsample, seed=0, progress=False)
    t1, c1 = time.perf_counter(), time.process_time()
    paths = tree.route(x)
    t2, c2 = time.perf_counter(), time.process_time()
    leaves = torch.bincount(paths[:, -1], minlength=tree.num_nodes(len(branching) - 1))
    print(json.dumps({"fit_s": t1 - t0, "fit_cpu_s": c1 - c0, "route_s": t2 - t1, "route_cpu_s": c2 - c1,
                      "nonempty_leaves": int((leaves > 0).sum()), "largest_leaf": int(leaves.max())}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench tree", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[62_500, 250_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--branching", type=int, nargs="+", default=[16, 16, 16, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--subsample", type=int, default=6400)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.dim, args.branching, args.steps, args.subsample)
        return
    print(f"tree {args.branching}, dim {args.dim}, {args.steps} EM steps on subsamples of {args.subsample}; "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    print(f"{'vectors':>10} {'sample MB':>10} {'fit s':>8} {'fit CPU s':>10} {'route s':>8} {'route CPU s':>12} "
          f"{'peak RSS MB':>12} {'leaves used':>12} {'largest leaf':>13}", flush=True)
    for n in args.sizes:
        cmd = [sys.executable, "-m", "hmtrain.bench.tree", "--child", str(n), "--dim", str(args.dim),
               "--branching", *map(str, args.branching), "--steps", str(args.steps),
               "--subsample", str(args.subsample)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"size {n} failed (status {status})")
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{n:>10,} {n * args.dim * 4 / 2**20:>10.0f} {r['fit_s']:>8.1f} {r['fit_cpu_s']:>10.1f} "
              f"{r['route_s']:>8.1f} {r['route_cpu_s']:>12.1f} {usage.ru_maxrss / 1024:>12.0f} "
              f"{r['nonempty_leaves']:>12,} {r['largest_leaf']:>13,}", flush=True)


if __name__ == "__main__":
    main()
