"""`hmtrain bench train_ranks`: the trainer on 1, 4 and 8 gloo ranks, against one process.

    hmtrain bench train_ranks [--ranks 4 8] [--placement owner] [--pretrain-steps 2] [--memory-steps 4]

One synthetic corpus is prepared once (hashing router, tree [4, 4]: 4 level-1 subtrees, so owner
placement runs 4 ranks as 4 groups of one and 8 as 4 groups of 2, with level 1 kept inside each group by
`parallel.replicate_levels=1`). Then `hmtrain train` runs the same global batch of 16 sequences in one
process and under `torchrun --nproc_per_node N` for each N: both phases, the anchor co-trained. The table
gives, per world size, the largest relative difference of the per-step loss from the one-process run,
the largest absolute difference of any bank weight after training, and the wall time of the run (the
machine's cores are shared by all N ranks: a correctness check, not a speed-up). The tests run 2 to 4
ranks (tests/dist/test_train_distributed.py); this is the check at more ranks than they can afford.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_dim=16",
         "model.ffn_hidden=64", "memory.units=[8,4]", "tree.branching=[4,4]", "data.seq_len=64",
         "data.embedder=hashing", "data.tokenizer=byte", "data.shard_samples=16", "data.heldout_fraction=0.1"]
TRAIN = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.log_every=1", "logging.mlflow=false",
         "train.progress=false", "train.anchor=cotrain", "train.anchor_optim.lr=3e-3", "train.memory_optim.lr=3e-2",
         "train.clip_grad=1.0", "parallel.timeout_s=120", "train.checkpoint_every=1000"]


def _cli(*args: str, cwd: Path, nproc: int = 1) -> float:
    """Run `hmtrain ARGS` (under torchrun for nproc > 1); its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "hmtrain.cli", *args]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = ["timeout", "--signal=KILL", "1800", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port), "--max_restarts", "0",
               "-m", "hmtrain.cli", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train_ranks: {' '.join(args[:1])} on {nproc} rank(s) failed ({proc.returncode}):\n"
                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.monotonic() - start


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _bank(run_dir: Path) -> dict:
    from hmtrain.eval.loading import load_trained

    return {k: v.float().clone() for k, v in load_trained(run_dir).bank.tables.items()}


def compare(reference: Path, run: Path) -> tuple[float, float]:
    """(largest relative per-step loss difference, largest absolute bank weight difference)."""
    want, got = _losses(reference), _losses(run)
    if want.keys() != got.keys():
        sys.exit(f"train_ranks: {run} logged steps {sorted(got)}, the one-process run {sorted(want)}")
    loss_gap = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    bank_a, bank_b = _bank(reference), _bank(run)
    bank_gap = max(float((bank_a[k] - bank_b[k]).abs().max()) for k in bank_a)
    return loss_gap, bank_gap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench train_ranks", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--placement", choices=["gather", "owner"], default="owner")
    parser.add_argument("--pretrain-steps", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=4)
    args = parser.parse_args(argv)
    bad = [n for n in args.ranks if n < 2 or 16 % n]
    if bad:
        parser.error(f"--ranks {bad}: each must be at least 2 and divide the global batch of 16")
    with tempfile.TemporaryDirectory(prefix="hmtrain-train-ranks-") as tmp:
        root = Path(tmp)
        _cli("data", "synth", "--out", str(root / "corpus"), "--people", "40", "--documents", "240", cwd=root)
        data = [*MODEL, f"data.documents={root / 'corpus' / 'documents.jsonl.gz'}", f"data.prepared={root / 'prep'}"]
        _cli("data", "prepare", "--config", "tiny", *data, cwd=root)
        steps = [f"train.pretrain_steps={args.pretrain_steps}", f"train.memory_steps={args.memory_steps}"]
        placement = [f"parallel.placement={args.placement}", "parallel.replicate_levels=1"]

        def train(name: str, nproc: int) -> tuple[Path, float]:
            run_dir = root / name
            seconds = _cli("train", "--config", "tiny", *data, *TRAIN, *steps, *placement,
                           f"train.run_dir={run_dir}", cwd=root, nproc=nproc)
            return run_dir, seconds

        reference, reference_s = train("one", 1)
        rows = [f"| 1 | - | 0 | 0 | {reference_s:.0f} |"]
        for n in args.ranks:
            run, seconds = train(f"ranks{n}", n)
            loss_gap, bank_gap = compare(reference, run)
            rows.append(f"| {n} | {args.placement} | {loss_gap:.2e} | {bank_gap:.2e} | {seconds:.0f} |")
    print(f"train_ranks, {datetime.date.today()}, {args.pretrain_steps} pretrain + {args.memory_steps} memory "
          f"steps, global batch 16, micro-batch 2, tree [4, 4], level 1 replicated in groups\n")
    print("| ranks | placement | max rel. loss diff vs 1 process | max abs. bank diff | wall s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
