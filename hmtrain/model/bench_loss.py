"""Peak memory and time of the LM loss, forward + backward: full logits vs `lm_loss_sum`'s chunks.

    python -m hmtrain.model.bench_loss                       # CPU: 4,096 tokens, vocab 16,384, d 256
    python -m hmtrain.model.bench_loss --device cuda --tokens 16384 --vocab 50432 --d-model 512 --dtype bf16

`plain` is what training did before: logits = hidden @ weight.T for all tokens, then fp32
cross-entropy (`lm_loss`), then backward. `chunked N` is `lm_loss_sum(..., chunk_tokens=N)`.
Peak memory is the growth above the inputs during one forward + backward: on CUDA from
`torch.cuda.max_memory_allocated`; on CPU from the process's peak RSS (each row runs in a fresh
process, so one row's peak cannot hide another's). Time is the median over `--iters` runs after a
warm-up (CUDA events on GPU). Inputs are seeded, so every row gets the same ones.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from typing import Callable

import torch

from hmtrain.model.loss import lm_loss_sum
from hmtrain.model.transformer import lm_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(tokens: int, vocab: int, d_model: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, d_model, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=gen) * d_model ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[:, ::16] = -100  # some ignored tokens, as padding gives
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


def measure(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(peak bytes above the inputs, median ms) of one row."""
    torch.set_num_threads(args.threads)
    hidden, weight, labels = make_inputs(args.tokens, args.vocab, args.d_model, DTYPES[args.dtype], args.device)
    step = step_fn(name, hidden, weight, labels)
    if args.device.startswith("cuda"):
        step()  # warm-up; .grad buffers now exist, as they do in training
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        step_fn(name, *make_inputs(64, 256, args.d_model, DTYPES[args.dtype], args.device))()  # load code pages
        hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
        base = _rss_bytes()
        step()  # the first step in this process: its peak RSS is this row's peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
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
    return float(peak), statistics.median(times)


def _child(name: str, args: argparse.Namespace, queue) -> None:
    queue.put(measure(name, args))


def measure_isolated(name: str, args: argparse.Namespace) -> tuple[float, float]:
    if args.device.startswith("cuda"):
        return measure(name, args)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    rows = {name: measure_isolated(name, args) for name in names}
    base_mem, base_ms = rows["plain"]
    print(f"{'path':<16}{'peak MiB':>10}{'x plain':>9}{'ms':>10}{'x plain':>9}")
    for name, (mem, ms) in rows.items():
        print(f"{name:<16}{mem / 2**20:>10.1f}{mem / base_mem:>9.2f}{ms:>10.1f}{ms / base_ms:>9.2f}")


if __name__ == "__main__":
    main()
