"""Peak memory and time of the LM loss, forward + backward: full logits vs `lm_loss_sum`'s chunks.

    python -m hmtrain.bench.loss                       # CPU: 4,096 tokens, vocab 16,384, d 256
    python -m hmtrain.bench.loss --device cuda --tokens 16384 --vocab 50432 --d-model 512 --dtype bf16

`plain` is what training did before: logits = hidden @ weight.T for all tokens, then fp32
cross-entropy (`lm_loss`), then backward. `chunked N` is `lm_loss_sum(..., chunk_tokens=N)`.
Peak memory is the growth above the inputs during one forward + backward: on CUDA from
`torch.cuda.max_memory_allocated`; on CPU from the peak RSS of a fresh process per row, with
glibc told to return every buffer over 128 KiB to the system when freed (so RSS follows the live
tensors; timing runs in another process with malloc's defaults). Time is the median over `--iters`
runs after a warm-up (CUDA events on GPU). Inputs are seeded, so every row gets the same ones.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from typing import Callable

import torch

from hmtrain.model.loss import lm_loss_sum
from hmtrain.model.transformer import lm_loss
from hmtrain.util.labels import IGNORE_INDEX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(tokens: int, vocab: int, d_model: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, d_model, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=gen) * d_model ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[:, ::16] = IGNORE_INDEX  # some ignored tokens, as padding gives
    return hidden, weight, labels.to(device)


def step_fn(name: str, hidden, weight, labels) -> Callable[[], None]:
    def plain() -> None:
        loss = lm_loss(hidden @ weight.T, labels, reduction="sum")
        loss.backward()

    def chunked() -> None:
        loss, _count = lm_loss_sum(hidden, weight, labels, chunk_tokens=int(name.split()[1]))
        loss.backward()

    return plain if name == "plain" else chunked


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_bytes(name: str, args: argparse.Namespace) -> float:
    """Growth of memory above the inputs (and their .grad buffers) during one forward + backward."""
    hidden, weight, labels = make_inputs(args.tokens, args.vocab, args.d_model, DTYPES[args.dtype], args.device)
    step = step_fn(name, hidden, weight, labels)
    if args.device.startswith("cuda"):
        step()  # warm-up; .grad buffers now exist, as they do in training
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    step_fn(name, *make_inputs(64, 256, args.d_model, DTYPES[args.dtype], args.device))()  # load code pages
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    base = _rss_bytes()
    step()  # the first full-size step in this process: its peak RSS is this row's peak
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def median_ms(name: str, args: argparse.Namespace) -> float:
    hidden, weight, labels = make_inputs(args.tokens, args.vocab, args.d_model, DTYPES[args.dtype], args.device)
    step = step_fn(name, hidden, weight, labels)
    step()
    times = []
    for _ in range(args.iters):
        if args.device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _child(fn, name: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    queue.put(fn(name, args))


def in_fresh_process(fn, name: str, args: argparse.Namespace, env: dict[str, str]) -> float:
    """fn(name, args) in a new process, so that one row's memory cannot hide or inflate another's."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # a spawned child reads malloc's settings from its environment at start
    try:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(fn, name, args, queue))
        proc.start()
        result = queue.get()
        proc.join()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return result


def measure(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(peak bytes above the inputs, median ms) of one row."""
    if args.device.startswith("cuda"):
        return peak_bytes(name, args), median_ms(name, args)
    # glibc otherwise keeps freed buffers below its (adaptive) mmap threshold, and RSS overstates
    # what is live; for timing malloc keeps its defaults
    malloc_env = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"}
    return in_fresh_process(peak_bytes, name, args, malloc_env), in_fresh_process(median_ms, name, args, {})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hmtrain bench loss", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096, help="B*T tokens in the micro-batch")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096], help="chunk_tokens values")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    args = p.parse_args(argv)
    names = ["plain"] + [f"chunked {c}" for c in args.chunks]
    print(f"device {args.device}, {args.tokens} tokens, vocab {args.vocab}, d {args.d_model}, {args.dtype}; "
          f"full fp32 logits would be {args.tokens * args.vocab * 4 / 2**20:.0f} MiB")
    rows = {name: measure(name, args) for name in names}
    base_mem, base_ms = rows["plain"]
    print(f"{'path':<16}{'peak MiB':>10}{'x plain':>9}{'ms':>10}{'x plain':>9}")
    for name, (mem, ms) in rows.items():
        print(f"{name:<16}{mem / 2**20:>10.1f}{mem / base_mem:>9.2f}{ms:>10.1f}{ms / base_ms:>9.2f}")


if __name__ == "__main__":
    main()
