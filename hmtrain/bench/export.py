"""Benchmark: the memory `hmtrain export` and `load_trained` (what `eval` and `generate --checkpoint` do) need.

    python -m hmtrain.bench.export [--workdir DIR] [--units 2048 128] [--branching 4 16] [--d 256 --layers 4]

Writes a checkpoint of an untrained bank (weights and both fp32 Adam moments, as training saves
them) on tiny prepared data, then runs, each in a fresh process: importing hmtrain (the floor),
`load_trained` (the model and the bank's weights, no moments: hmtrain/eval/loading.py) and
`export_checkpoint`. Columns: peak anonymous memory (sampled every 2 ms from /proc/self/status,
RssAnon: what the process really needs) and peak RSS (VmHWM; includes the output file's pages
mapped while it is written, which the kernel can write back and drop), both above the floor, in
units of the largest table. Target for export: anonymous peak about one table (DCP reads a saved
chunk whole), whatever the number of tables; for load_trained: the whole bank's weights plus that chunk.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import re, sys, threading, time
peak = [0]
def rss_anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
def sample():
    while True:
        peak[0] = max(peak[0], rss_anon()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
import torch, hmtrain.serve.export, hmtrain.eval.loading
time.sleep(0.05)
task, ckpt, out = sys.argv[1:4]
if task == "load":
    hmtrain.eval.loading.load_trained(ckpt)
elif task == "export":
    hmtrain.serve.export.export_checkpoint(ckpt, out)
time.sleep(0.05)
peak[0] = max(peak[0], rss_anon())
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
print(peak[0], hwm)
"""


def make_checkpoint(workdir: Path, args) -> tuple[Path, dict[str, int]]:
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from hmtrain.checkpoint.checkpointer import Checkpointer
    from hmtrain.checkpoint.formats import FORMAT
    from hmtrain.config import load_config
    from hmtrain.config.load import to_yaml
    from hmtrain.data.corpus.synth import synthesize
    from hmtrain.data.format.prepared import PreparedData
    from hmtrain.data.prepare.pipeline import prepare
    from hmtrain.memory import build_bank
    from hmtrain.model import Transformer
    from hmtrain.serve.export import bank_tables

    synthesize(workdir / "corpus", num_people=40, num_documents=200, zipf_exponent=1.1, num_choices=4, seed=0)
    overrides = [f"model.d_model={args.d}", f"model.n_layers={args.layers}", "model.n_heads=2",
                 f"model.head_dim={args.d // 2}", f"model.ffn_hidden={2 * args.d}", "model.vocab_size=384",
                 f"memory.units={list(args.units)}", f"tree.branching={list(args.branching)}", "data.seq_len=64",
                 "data.embedder=hashing", "data.tokenizer=byte", "data.shard_samples=64",
                 f"data.documents={workdir / 'corpus' / 'documents.jsonl.gz'}", f"data.prepared={workdir / 'prepared'}"]
    cfg = load_config("tiny", overrides)
    prepare(cfg, progress=False)
    data = PreparedData.open(cfg.data.prepared)
    model, bank = Transformer(cfg.model, max_seq_len=cfg.data.seq_len), build_bank(cfg)
    state = {"model": get_model_state_dict(model), "bank": bank.state_dict()}
    path = Checkpointer(workdir / "run" / "checkpoints").write(
        cfg.train.pretrain_steps, state, {"loader": {}, "format": FORMAT, "data_fingerprints": data.fingerprints()},
        to_yaml(cfg))
    sizes = {name: 4 * int(torch.Size(shape).numel()) for name, (_, shape) in bank_tables(cfg).items()}
    return path, sizes


def measure(task: str, checkpoint: Path, out: Path) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", PROBE, task, str(checkpoint), str(out)], capture_output=True,
                          text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    anon, hwm = proc.stdout.split()
    return int(anon), int(hwm)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--units", type=int, nargs="+", default=[2048, 128])
    parser.add_argument("--branching", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        checkpoint, sizes = make_checkpoint(workdir, args)
        largest, bank = max(sizes.values()), sum(sizes.values())
        floor = measure("import", checkpoint, workdir / "unused")
        rows = {"load_trained": measure("load", checkpoint, workdir / "unused"),
                "export": measure("export", checkpoint, workdir / "exported")}
    mb = 2 ** 20
    print(f"bank tables (fp32): {json.dumps({k: round(v / mb, 1) for k, v in sizes.items()})} MiB; "
          f"whole bank {bank / mb:.1f} MiB, largest table {largest / mb:.1f} MiB; floor (imports) "
          f"anon {floor[0] / mb:.0f} MiB, rss {floor[1] / mb:.0f} MiB")
    print(f"| {'command':<13} | {'peak anon MiB':>13} | {'/ largest table':>15} | {'peak rss MiB':>12} | "
          f"{'/ largest table':>15} |")
    print(f"|{'-' * 15}|{'-' * 14}:|{'-' * 16}:|{'-' * 13}:|{'-' * 16}:|")
    for name, (anon, hwm) in rows.items():
        anon, hwm = anon - floor[0], hwm - floor[1]
        print(f"| {name:<13} | {anon / mb:>13.1f} | {anon / largest:>15.2f} | {hwm / mb:>12.1f} | "
              f"{hwm / largest:>15.2f} |")


if __name__ == "__main__":
    main()
