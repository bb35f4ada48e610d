"""`hmtrain bench memory_step`: a co-trained memory step against an anchor step widened by the same units.

    hmtrain bench memory_step [--sequences 1 --tokens 256] [--repeats 40] [--clock wall|cpu] [--config tiny]
                              [--parts] [key=value ...]

Both are whole training steps on the same tokens, on one process: forward, backward, optimizer. The
memory step runs the anchor (`model.ffn_hidden` h) with the memory bank of `memory.units` (M units per
layer): plan the step, fetch the blocks, forward and backward through the memory FFN, return the row
gradients, the bank's sparse AdamW, the anchor's AdamW. The baseline is the anchor alone with its FFN
widened to h + M: the same FFN arithmetic, so the ratio is what the bank's own work (rows copied, the
block gather, the sparse update) costs on top. Steps are paired (baseline then memory, alternating
which goes first) and the ratio of each pair is taken, so drifting load on the machine cancels; the
table gives the median ratio with its 10th and 90th percentiles, and the median milliseconds of each.
`--clock cpu` times each step by this thread's CPU time (time.thread_time) instead of the wall clock:
on a machine other jobs load, the time the step was descheduled drops out (one thread computes the step:
torch.set_num_threads(1)). `--parts` also prints the median of each part of the two steps, timed by the
same clock, and what each part of the memory step costs beyond the widened anchor's.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from hmtrain.config import load_config
from hmtrain.memory import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.model.transformer import Transformer


def models(cfg_model, units: list[int], branching: list[int], vocab: int, tokens: int):
    anchor_cfg = dataclasses.replace(cfg_model, vocab_size=vocab)
    wide_cfg = dataclasses.replace(anchor_cfg, ffn_hidden=anchor_cfg.ffn_hidden + sum(units))
    torch.manual_seed(0)
    anchor, wide = Transformer(anchor_cfg, max_seq_len=tokens), Transformer(wide_cfg, max_seq_len=tokens)
    bank = MemoryBank(n_layers=anchor_cfg.n_layers, kind=SwiGLUUnits(d_model=anchor_cfg.d_model),
                      branching=branching, units=units, generic=True, init_std=anchor_cfg.init_std)
    return anchor, wide, bank


def run(args) -> dict:
    cfg = load_config(args.config, args.overrides)
    units, branching = list(cfg.memory.units), list(cfg.tree.branching)
    anchor, wide, bank = models(cfg.model, units, branching, args.vocab, args.tokens)
    opt_anchor = torch.optim.AdamW(anchor.parameters(), lr=1e-4)
    opt_wide = torch.optim.AdamW(wide.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    tokens = torch.randint(0, args.vocab, (args.sequences, args.tokens))
    labels = torch.roll(tokens, -1, 1)
    leaves = int(np.prod(branching))

    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    parts: dict[str, list[float]] = {name: [] for name in PARTS}
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:  # the end of a part of a step (`--parts`)
        marks.append((name, clock()))

    def memory_step():
        leaf = rng.integers(0, leaves, size=args.sequences)
        paths = np.stack([leaf // int(np.prod(branching[lvl + 1:])) for lvl in range(len(branching))], axis=1)
        plan = bank.plan_step([(paths, rng.random(args.sequences) < 1 / (branching[0] + 1))])
        fetched = bank.fetch(plan, 0)
        mark("bank: plan and fetch")
        loss, count = anchor(tokens, memory=fetched, labels=labels)
        mark("memory: forward")
        (loss / count).backward()
        mark("memory: backward")
        bank.return_grads(fetched)
        bank.finish_grads()
        mark("bank: return and finish gradients")
        bank.step(1e-4)
        mark("bank: sparse AdamW")
        opt_anchor.step()
        opt_anchor.zero_grad(set_to_none=True)
        mark("memory: anchor AdamW")

    def anchor_step():
        loss, count = wide(tokens, labels=labels)
        mark("widened: forward")
        (loss / count).backward()
        mark("widened: backward")
        opt_wide.step()
        opt_wide.zero_grad(set_to_none=True)
        mark("widened: AdamW")

    def timed(fn) -> float:
        marks.clear()
        start = clock()
        fn()
        end = clock()
        for (name, at), before in zip(marks, [start] + [at for _, at in marks]):
            parts[name].append(at - before)
        return end - start

    for _ in range(args.warmup):
        timed(anchor_step), timed(memory_step)
    for times in parts.values():
        times.clear()
    pairs = []
    for r in range(args.repeats):
        if r % 2:
            mem, base = timed(memory_step), timed(anchor_step)
        else:
            base, mem = timed(anchor_step), timed(memory_step)
        pairs.append((base, mem))
    base, mem = np.array(pairs).T
    ratio = mem / base
    return {"config": args.config, "layers": cfg.model.n_layers, "d": cfg.model.d_model, "h": cfg.model.ffn_hidden,
            "units": units, "tokens": args.sequences * args.tokens, "base_ms": 1e3 * np.median(base),
            "mem_ms": 1e3 * np.median(mem), "ratio": float(np.median(ratio)),
            "low": float(np.percentile(ratio, 10)), "high": float(np.percentile(ratio, 90)), "repeats": args.repeats,
            "clock": args.clock, "parts_ms": {name: 1e3 * float(np.median(t)) for name, t in parts.items()}}


PARTS = ("bank: plan and fetch", "memory: forward", "memory: backward", "bank: return and finish gradients",
         "bank: sparse AdamW", "memory: anchor AdamW", "widened: forward", "widened: backward", "widened: AdamW")


def render_parts(r: dict) -> str:
    """Each part's median, and what each part of the memory step costs beyond the widened anchor's: forward
    and backward against theirs, the bank's own parts whole, and the two optimizers (the bank's sparse AdamW
    and the anchor's AdamW) against the widened anchor's AdamW, which updates the M extra units too."""
    ms = r["parts_ms"]
    extra = {"bank: plan and fetch": ms["bank: plan and fetch"],
             "memory: forward": ms["memory: forward"] - ms["widened: forward"],
             "memory: backward": ms["memory: backward"] - ms["widened: backward"],
             "bank: return and finish gradients": ms["bank: return and finish gradients"],
             "bank: sparse AdamW": ms["bank: sparse AdamW"] + ms["memory: anchor AdamW"] - ms["widened: AdamW"]}
    lines = ["| part | median ms | memory minus widened, ms |", "|---|---:|---:|"]
    for name in PARTS:
        lines.append(f"| {name} | {ms[name]:.2f} | " + (f"{extra[name]:+.2f} |" if name in extra else "|"))
    lines.append(f"| sum of the differences (the bank's AdamW row: both optimizers against the widened one) | | "
                 f"{sum(extra.values()):+.2f} |")
    return "\n".join(lines)


def render(r: dict) -> str:
    return "\n".join([
        f"{r['config']}: {r['layers']} layers, d {r['d']}, FFN {r['h']}, memory units {r['units']} "
        f"(M = {sum(r['units'])}), {r['tokens']} tokens a step, {r['repeats']} paired steps, {r['clock']} clock",
        "| step | median ms | vs anchor widened by M |", "|---|---:|---|",
        f"| anchor, FFN {r['h']} + {sum(r['units'])} | {r['base_ms']:.1f} | 1.00x |",
        f"| anchor {r['h']} + memory {sum(r['units'])} (co-trained) | {r['mem_ms']:.1f} | "
        f"{r['ratio']:.3f}x [{r['low']:.3f}, {r['high']:.3f}] |"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hmtrain bench memory_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by the wall clock or by this thread's CPU time")
    parser.add_argument("--parts", action="store_true",
                        help="also print each part of the two steps (median by the same clock)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args)
    print(render(result))
    if args.parts:
        print(render_parts(result))


if __name__ == "__main__":
    main()
