"""`hmtrain data prepare` at two corpus sizes: peak RSS per process, and documents/s per stage.

    python -m hmtrain.bench.prepare --sizes 10000 100000 --per-file 5000

Writes a synthetic corpus per size (jsonl files of `--per-file` documents of Zipf-distributed words,
so the corpus grows by more files, as a real one does), then prepares it in a fresh child process
(its peak RSS is wait4's ru_maxrss of that process alone). The samples are of a stated size
(`--sample`: tree and tokenizer), as a corpus too large for memory needs, so only what is streamed
grows with the corpus. Prints one row per size with the peak RSS and its ratio to the first size,
then the documents/s of every stage step (read, embed, route, ...) by wall time and by the process's
CPU time (on a shared machine wall time also counts the waits for a core).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_corpus(root: Path, documents: int, per_file: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    root.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, documents, per_file)):
        with open(root / f"part-{f:05d}.jsonl", "w") as out:
            for i in range(start, min(documents, start + per_file)):
                words = rng.choice(len(vocab), size=int(rng.integers(50, 400)), p=weights)
                out.write(json.dumps({"id": f"doc{i}", "text": " ".join(vocab[w] for w in words)}) + "\n")


def overrides(args, corpus: Path, prepared: Path) -> list[str]:
    return [f"data.documents={corpus}", f"data.prepared={prepared}", f"data.embedder={args.embedder}",
            "data.tokenizer=bpe", f"data.tokenizer_vocab={args.vocab}", f"data.tokenizer_sample={args.sample}",
            f"tree.fit_sample={args.sample}", "tree.branching=[16,16]", "memory.units=[16,16]",
            "data.seq_len=512", "data.shard_samples=1024", "data.heldout_fraction=0.05"]


def child(argv: list[str]) -> None:
    import logging

    from hmtrain.config import load_config
    from hmtrain.data.prepare.pipeline import run_prepare

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config("tiny", argv)
    t0 = time.perf_counter()
    _, meter = run_prepare(cfg, progress=False)
    print(json.dumps({"wall_s": time.perf_counter() - t0, "rates": meter.rates()}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--per-file", type=int, default=5_000)
    parser.add_argument("--sample", type=int, default=5_000, help="tree and tokenizer sample (documents)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--embedder", default="hashing")
    parser.add_argument("--workdir", type=Path, help="where corpora go (default: a temporary directory)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    rows = []
    for size in args.sizes:
        corpus, prepared = work / f"corpus-{size}", work / f"prepared-{size}"
        if not corpus.exists():
            write_corpus(corpus, size, args.per_file)
        shutil.rmtree(prepared, ignore_errors=True)
        cmd = [sys.executable, "-m", "hmtrain.bench.prepare", "--child", *overrides(args, corpus, prepared)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"prepare of {size} documents failed (status {status})")
        result = json.loads(out.strip().splitlines()[-1])
        rows.append((size, len(list(corpus.iterdir())), usage.ru_maxrss / 1024, result))
        shutil.rmtree(prepared, ignore_errors=True)
    base = rows[0][2]
    print(f"embedder {args.embedder}, bpe {args.vocab}, tree [16,16], samples {args.sample} documents, "
          f"{args.per_file} documents per file, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'documents':>10} {'files':>6} {'wall s':>8} {'peak RSS MB':>12} {'vs first':>9}")
    for size, files, rss, result in rows:
        print(f"{size:>10,} {files:>6} {result['wall_s']:>8.1f} {rss:>12.0f} {rss / base:>9.2f}")
    steps = list(rows[-1][3]["rates"])
    print("\ndocuments/s per step (one process), largest size:")
    print(f"{'step':<22} {'documents':>10} {'wall s':>8} {'CPU s':>8} {'docs/s':>9} {'docs/CPU s':>11}")
    for step in steps:
        r = rows[-1][3]["rates"][step]
        print(f"{step:<22} {r['documents']:>10,} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} "
              f"{r['docs_per_s']:>9,.0f} {r['docs_per_cpu_s']:>11,.0f}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
