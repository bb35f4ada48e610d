"""The GPU check's training sections: a corpus made on the machine, 20-step training smokes of the
paper anchors on one GPU, and eval, export and generate on the 160m run's checkpoint.

Nothing prepared travels: `data` writes a synthetic corpus (`hmtrain data synth`) and prepares it
with the hashing embedder and the byte tokenizer, for every paper preset at once (all have
seq_len 2,048 and a 4-level tree). The bank is cut to fit one GPU by a 4-way tree
(4+16+64+256 nodes) with the paper's units per level, so each sequence fetches exactly the paper's
memory. Each run: bf16, one process (the plain model; FSDP2 needs several ranks), a global batch
of one micro-batch, MLflow off, a 5-step warmup so the loss can fall within 20 steps. Per phase it
reports the median step time, tokens/s and MFU after the first steps (compilation, warm-up), and
the first and last losses; beside them the peak CUDA memory against `hmtrain info`'s prediction
(which counts no activations). `train_160m_widened` is the anchor alone with its FFN widened by
the fetched units: the memory phase's cost over a dense model of the same active width.
"""
from __future__ import annotations

import io
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WARM_STEPS = 3  # steps of each phase left out of the medians: compilation, allocator and autotune warm-up
GPU_DATA = ["data.embedder=hashing", "data.tokenizer=byte", "model.vocab_size=384", "tree.branching=[4,4,4,4]",
            "data.seq_len=2048", "data.shard_samples=256", "data.heldout_fraction=0.05"]
# the smoke's model: milliseconds per step on CPU (as tests/e2e/conftest.py's MICRO)
SMOKE_DATA = ["data.embedder=hashing", "data.tokenizer=byte", "model.vocab_size=300", "model.d_model=32",
              "model.n_layers=2", "model.n_heads=2", "model.head_dim=16", "model.ffn_hidden=64", "memory.units=[8,4]",
              "tree.branching=[2,3]", "data.seq_len=64", "data.shard_samples=16", "data.heldout_fraction=0.1",
              "eval.batch_size=8", "eval.max_probes=20"]
PRESETS = {"160m": "paper-160m", "410m": "paper-410m", "1.4b": "paper-1.4b"}


def work_dir(run) -> Path:
    return run.out / "work"


def data_overrides(run) -> list[str]:
    root = work_dir(run)
    return [*(SMOKE_DATA if run.smoke else GPU_DATA), f"data.documents={root / 'corpus' / 'documents.jsonl.gz'}",
            f"data.prepared={root / 'prepared'}", f"data.probes={root / 'corpus' / 'probes.jsonl'}"]


def preset(run, size: str) -> str:
    return "tiny" if run.smoke else PRESETS[size]


def data(run) -> None:
    from hmtrain.config import load_config
    from hmtrain.data.corpus.synth import synthesize
    from hmtrain.data.prepare.pipeline import prepare

    root = work_dir(run)
    started = time.perf_counter()
    people, documents = (40, 200) if run.smoke else (800, 8000)
    synthesize(root / "corpus", num_people=people, num_documents=documents, seed=0)
    run.put("synth_s", time.perf_counter() - started)
    started = time.perf_counter()
    prepare(load_config(preset(run, "160m"), data_overrides(run)), overwrite=True, progress=False)
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    run.put("prepare_s", time.perf_counter() - started)
    run.put("documents", documents)
    run.put("sequences", {split: info["sequences"] for split, info in manifest["splits"].items()})
    run.put("tree_nodes", [len(level) for level in manifest["node_tokens"]])
    run.put("summary", f"{documents} synthetic documents prepared in {run.results['prepare_s']:.1f} s "
                       f"(hashing embedder, byte tokenizer): {run.results['sequences']} sequences, tree nodes per "
                       f"level {run.results['tree_nodes']}")


def train_overrides(run, name: str, steps: int, size: str) -> list[str]:
    return [*data_overrides(run), f"train.run_dir={work_dir(run) / 'runs' / name}",
            f"train.pretrain_steps={steps}", f"train.memory_steps={steps}", "train.log_every=1",
            "train.checkpoint_every=100000", "train.progress=false", "train.anchor_optim.warmup_steps=5",
            "logging.mlflow=false", "train.async_checkpoint=false",
            *([] if run.smoke else ["train.device=cuda", "train.dtype=bf16"]),
            # one micro-batch per step: the preset's micro-batch, the paper's per-rank work
            *([] if run.smoke else [f"train.global_batch_size={MICRO[size]}",
                                    f"train.pretrain_global_batch_size={MICRO[size]}"])]


MICRO = {"160m": 16, "410m": 8, "1.4b": 4}  # the presets' train.micro_batch_size


def phase_summary(records: list[dict]) -> dict:
    """Per phase: medians after the warm-up steps, the first step's time, first and last loss."""
    out = {}
    for phase, label in ((0.0, "pretrain"), (1.0, "memory")):
        rows = [r for r in records if r.get("phase") == phase]
        if not rows:
            continue
        steady = rows[WARM_STEPS:] or rows[-1:]
        entry = {"steps": len(rows), "first_step_s": rows[0]["step_s"], "loss_first": rows[0]["loss"],
                 "loss_last": rows[-1]["loss"], "loss_fell": rows[-1]["loss"] < rows[0]["loss"]}
        for key in ("step_s", "tokens_per_s", "mfu"):
            if key in steady[0]:
                entry[key] = statistics.median(r[key] for r in steady)
        out[label] = entry
    return out


def predicted_bytes(cfg) -> int:
    """`hmtrain info`'s per-rank total for one rank (before activations), without printing it."""
    from rich.console import Console

    from hmtrain.info import print_info

    return int(print_info(cfg, console=Console(file=io.StringIO()), world_size=1)["per_rank"]["total"])


def train_run(run, name: str, size: str, extra: list[str], steps: int = 20, keep: bool = False) -> dict:
    """Train one config, report it; the run directory is deleted unless `keep` (checkpoints fill the disk:
    22 GB for 1.4b's anchor with its AdamW state)."""
    import torch

    from hmtrain.config import load_config
    from hmtrain.train.trainer import train

    cfg = load_config(preset(run, size), [*train_overrides(run, name, 3 if run.smoke else steps, size), *extra])
    run.put("config", {"preset": preset(run, size), "overrides": extra, "micro_batch": cfg.train.micro_batch_size,
                       "seq_len": cfg.data.seq_len})
    run.put("predicted_gib", predicted_bytes(cfg) / 2**30)
    cuda = torch.cuda.is_available() and not run.smoke
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    checkpoint = train(cfg)
    run.put("wall_s", time.perf_counter() - started)
    if cuda:
        run.put("peak_gib", torch.cuda.max_memory_allocated() / 2**30)
    lines = (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()
    phases = phase_summary([json.loads(line) for line in lines if line.strip()])
    run.put("phases", phases)
    run.put("checkpoint", str(checkpoint) if keep else None)
    if not keep:
        shutil.rmtree(cfg.train.run_dir)
    run.put("summary", train_summary(run.results))
    return run.results


def train_summary(results: dict) -> str:
    parts = []
    for label, p in results["phases"].items():
        mfu = f", MFU {100 * p['mfu']:.1f}%" if "mfu" in p else ""
        parts.append(f"{label}: {1e3 * p['step_s']:.0f} ms/step, {p['tokens_per_s']:,.0f} tok/s{mfu}, "
                     f"loss {p['loss_first']:.2f} -> {p['loss_last']:.2f}")
    memory = (f"peak {results['peak_gib']:.1f} GiB vs info {results['predicted_gib']:.1f} GiB before activations"
              if "peak_gib" in results else f"info predicts {results['predicted_gib']:.2f} GiB before activations")
    return "; ".join([*parts, memory])


def smoke_skip(run, why: str):
    return f"smoke: {why}" if run.smoke else None


def train_160m(run) -> None:
    train_run(run, "160m", "160m", [], keep=True)  # eval_export_generate reads its checkpoint


def train_160m_compile(run):
    if run.smoke:  # inductor on CPU takes minutes; tests/bench/test_gpu_check.py trains compiled on CPU
        return smoke_skip(run, "inductor on CPU takes minutes; the compiled memory phase has its own CPU test")
    train_run(run, "160m-compile", "160m", ["parallel.compile=true"])


def train_160m_checkpointing(run) -> None:
    train_run(run, "160m-ac", "160m", ["parallel.activation_checkpointing=true"])


def train_160m_widened(run) -> None:
    """The anchor alone, FFN widened by the memory's units per layer, pretraining only."""
    from hmtrain.config import load_config

    cfg = load_config(preset(run, "160m"), data_overrides(run))
    width = cfg.model.ffn_hidden + sum(cfg.memory.units)
    train_run(run, "160m-widened", "160m", [f"model.ffn_hidden={width}", "train.memory_steps=0"])


def train_410m(run):
    if run.smoke:
        return smoke_skip(run, "the same code as train_160m")
    train_run(run, "410m", "410m", [], steps=10)


def train_1_4b(run):
    if run.smoke:
        return smoke_skip(run, "the same code as train_160m")
    train_run(run, "1.4b", "1.4b", [], steps=10)


def eval_export_generate(run) -> None:
    """`hmtrain eval`, `export` and `generate` on the 160m smoke run, through the CLI; seconds and exit codes."""
    root, overrides = work_dir(run), data_overrides(run)
    checkpoint = root / "runs" / "160m"
    limits = [] if run.smoke else ["eval.max_sequences=64", "eval.max_probes=200"]
    commands = {
        "eval": ["eval", "--config", preset(run, "160m"), *overrides, *limits, "--checkpoint", str(checkpoint),
                 "--out", str(root / "eval.json")],
        "export": ["export", "--checkpoint", str(checkpoint), "--out", str(root / "export"), "--overwrite"],
        "generate": ["generate", "--export", str(root / "export"), "--prompt", "The person born in", "--max-new-tokens",
                     "16"],
    }
    for name, argv in commands.items():  # as a user runs them: the CLI in a process of its own
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "hmtrain.cli", *argv], capture_output=True, text=True)
        run.put(name, {"rc": proc.returncode, "seconds": time.perf_counter() - started,
                       "output": proc.stdout[-300:]})
        if proc.returncode != 0:
            raise RuntimeError(f"hmtrain {name} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    run.put("summary", ", ".join(f"{name} {run.results[name]['seconds']:.1f} s" for name in commands) + ", all exit 0")


SECTIONS = {"data": data, "train_160m": train_160m, "train_160m_compile": train_160m_compile,
            "train_160m_checkpointing": train_160m_checkpointing, "train_160m_widened": train_160m_widened,
            "eval_export_generate": eval_export_generate, "train_410m": train_410m, "train_1.4b": train_1_4b}
