"""Benchmark the memory-augmented FFN: eager reference, compiled reference, Triton, the anchor FFN widened by
the memory's units (the memory step's baseline), dense-GEMM ceiling.

On a GPU (bf16, the paper's shapes, batch 8 x 2048 tokens)::

    python -m hmtrain.bench.memory_ffn

CPU smoke run (tiny shapes, torch implementations only, timings meaningless)::

    python -m hmtrain.bench.memory_ffn --device cpu --quick

FLOPs count the matmuls only: forward 3 GEMMs of N x d x (h+M) (gate, up, down), backward 6
(da, dx from gate and up, and the three weight gradients): 6 and 18 * N * d * (h+M) FLOPs with
N = B*T. The ceiling is the same 3 + 6 GEMMs as plain cuBLAS matmuls over a dense hidden width
h+M, with no activation, no per-sequence weights and no autograd.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hmtrain_kernels import memory_ffn, memory_ffn_torch

# d, anchor FFN width h, fetched memory units per layer M = sum of units on the path (docs/design.md)
PRESETS: dict[str, tuple[int, int, int]] = {
    "160m": (512, 2048, 256 + 64 + 16),
    "410m": (1024, 2816, 512 + 128 + 32),
    "1.4b": (2048, 5632, 768 + 256 + 16),
}
QUICK_PRESETS: dict[str, tuple[int, int, int]] = {"tiny": (64, 128, 24), "tiny-odd": (48, 80, 7)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    preset: str
    impl: str
    fwd_ms: float
    fwd_tflops: float
    fwdbwd_ms: float
    fwdbwd_tflops: float


def make_inputs(B: int, T: int, d: int, h: int, M: int, dtype: torch.dtype,
                device: str) -> list[torch.Tensor]:
    """Random inputs scaled like an initialised layer, so bf16 activations stay in range."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, fan_in: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen) / fan_in ** 0.5
        return t.to(device=device, dtype=dtype).requires_grad_()

    return [rand(B, T, d, fan_in=1), rand(h, d, fan_in=d), rand(h, d, fan_in=d), rand(d, h, fan_in=h),
            rand(B, M, d, fan_in=d), rand(B, M, d, fan_in=d), rand(B, d, M, fan_in=max(M, 1))]


def median_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in ms; CUDA events on GPU so only device time counts."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(iters)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in pairs)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ffn_impls(device: str, compile_ref: bool) -> dict[str, Callable[..., torch.Tensor]]:
    impls: dict[str, Callable[..., torch.Tensor]] = {"torch eager": memory_ffn_torch}
    if compile_ref:
        impls["torch.compile"] = torch.compile(memory_ffn_torch)
    if device.startswith("cuda"):
        impls["triton"] = lambda *t: memory_ffn(*t, impl="triton")
    return impls


def dense_ceiling(x: torch.Tensor, d: int, H: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """Forward and forward+backward of the same GEMMs over one dense [N, d] x [d, H] problem."""
    N = x.shape[0] * x.shape[1]
    opts = dict(device=x.device, dtype=x.dtype)
    xs, dy = torch.randn(N, d, **opts), torch.randn(N, d, **opts)
    wg, wu = torch.randn(H, d, **opts) / d ** 0.5, torch.randn(H, d, **opts) / d ** 0.5
    wd = torch.randn(d, H, **opts) / H ** 0.5

    def fwd() -> torch.Tensor:
        g, _u = xs @ wg.T, xs @ wu.T
        return g @ wd.T

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        g, _u = xs @ wg.T, xs @ wu.T
        _y = g @ wd.T
        da = dy @ wd  # [N, H]; stands in for both dg and du (same shapes, same FLOPs)
        dx = torch.addmm(da @ wg, da, wu)
        return dx, dy.T @ g, da.T @ xs, da.T @ xs

    return fwd, fwd_bwd


def widened_ffn(inputs: list[torch.Tensor], M: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """Forward and forward+backward of the anchor's own SwiGLU FFN widened to h + M units (autograd, shared
    weights): the FFN `hmtrain bench memory_step` compares the memory step with, the same FLOPs as the memory
    FFN in one GEMM per linear instead of an anchor GEMM plus a per-sequence bmm."""
    x, (h, d) = inputs[0], inputs[1].shape  # x and the anchor's w_gate [h, d]
    opts = dict(device=x.device, dtype=x.dtype)
    wide = [torch.randn(h + M, d, **opts).mul_(d ** -0.5).requires_grad_(),
            torch.randn(h + M, d, **opts).mul_(d ** -0.5).requires_grad_(),
            torch.randn(d, h + M, **opts).mul_((h + M) ** -0.5).requires_grad_()]
    dy = torch.randn_like(x)

    def fwd() -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, wide[0])) * F.linear(x, wide[1]), wide[2])

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(fwd(), [x, *wide], dy)

    return lambda: _no_grad(fwd), fwd_bwd


def check_triton(inputs: list[torch.Tensor]) -> float:
    """Largest error of the Triton output and gradients, relative to each tensor's eager max."""
    dy = torch.randn_like(inputs[0])
    worst = 0.0
    outs = []
    for fn in (memory_ffn_torch, lambda *t: memory_ffn(*t, impl="triton")):
        y = fn(*inputs)
        outs.append([y, *torch.autograd.grad(y, inputs, dy)])
    for ref, got in zip(*outs):
        if ref.numel():
            scale = ref.float().abs().max().clamp_min(1e-6)
            worst = max(worst, ((got.float() - ref.float()).abs().max() / scale).item())
    return worst


def bench_preset(name: str, shape: tuple[int, int, int], args: argparse.Namespace) -> list[Row]:
    d, h, M = shape
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.batch, args.seq, d, h, M, dtype, args.device)
    flops_fwd = 6 * args.batch * args.seq * d * (h + M)
    dy = torch.randn_like(inputs[0])
    rows = []

    def add(impl: str, fwd: Callable[[], object], fwd_bwd: Callable[[], object]) -> None:
        f_ms = median_ms(fwd, args.device, args.warmup, args.iters)
        fb_ms = median_ms(fwd_bwd, args.device, args.warmup, args.iters)
        rows.append(Row(name, impl, f_ms, flops_fwd / f_ms / 1e9, fb_ms, 3 * flops_fwd / fb_ms / 1e9))

    for impl, fn in ffn_impls(args.device, args.compile).items():
        # forward alone as at inference (no activations kept); warm-up absorbs compile and autotune
        add(impl, lambda fn=fn: _no_grad(lambda: fn(*inputs)),
            lambda fn=fn: torch.autograd.grad(fn(*inputs), inputs, dy))
    add("widened FFN (torch)", *widened_ffn(inputs, M))
    add("dense GEMM ceiling", *dense_ceiling(inputs[0], d, h + M))
    if args.device.startswith("cuda") and not args.no_check:
        print(f"[{name}] triton vs eager, max error relative to tensor max: {check_triton(inputs):.2e}")
    return rows


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.no_grad():
        return fn()


def print_table(rows: list[Row]) -> None:
    header = (f"{'preset':<9}{'impl':<20}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}"
              f"{'f+b vs eager':>14}{'f+b % ceil':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        group = [o for o in rows if o.preset == r.preset]
        eager = next(o for o in group if o.impl == "torch eager")
        ceil = next(o for o in group if o.impl == "dense GEMM ceiling")
        print(f"{r.preset:<9}{r.impl:<20}{r.fwd_ms:>9.3f}{r.fwd_tflops:>10.3g}{r.fwdbwd_ms:>9.3f}"
              f"{r.fwdbwd_tflops:>10.3g}{eager.fwdbwd_ms / r.fwdbwd_ms:>13.2f}x"
              f"{100 * r.fwdbwd_tflops / ceil.fwdbwd_tflops:>11.0f}%")


def print_targets(rows: list[Row]) -> None:
    """The issue's targets for Triton, forward+backward: >= 1.3x eager and >= 70% of the ceiling."""
    for preset in dict.fromkeys(r.preset for r in rows):
        group = {r.impl: r for r in rows if r.preset == preset}
        if "triton" not in group:
            continue
        speedup = group["torch eager"].fwdbwd_ms / group["triton"].fwdbwd_ms
        frac = group["triton"].fwdbwd_tflops / group["dense GEMM ceiling"].fwdbwd_tflops
        verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
        print(f"[{preset}] triton f+b: {speedup:.2f}x eager (target 1.30x: {verdict(speedup >= 1.3)}), "
              f"{100 * frac:.0f}% of ceiling (target 70%: {verdict(frac >= 0.7)})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hmtrain bench memory_ffn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (smoke test)")
    p.add_argument("--presets", default=None,
                   help=f"comma list of {sorted(PRESETS)}; with --quick, of {sorted(QUICK_PRESETS)}")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 (fp32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8; quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; quick 64)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10; quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed runs, median reported (default 50; quick 3)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile reference (always skipped on CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the Triton-vs-eager error check on GPU")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu --quick for a smoke run")
    if not args.device.startswith("cuda"):
        args.compile = False  # inductor on CPU needs a C++ toolchain and minutes; nothing to learn
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    defaults = (2, 64, 1, 3) if args.quick else (8, 2048, 10, 50)
    for key, value in zip(("batch", "seq", "warmup", "iters"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and not args.device.startswith("cuda"):
        torch.set_num_threads(1)  # tiny matmuls: extra threads only spin against each other
    table = QUICK_PRESETS if args.quick else PRESETS
    names = list(table) if args.presets is None else args.presets.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown preset(s) {unknown}; choose from {sorted(table)}")
    args.shapes = {n: table[n] for n in names}
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"memory_ffn benchmark on {device_name}: {args.dtype}, batch {args.batch} x {args.seq} tokens, "
          f"median of {args.iters} runs after {args.warmup} warm-up")
    rows = [row for name, shape in args.shapes.items() for row in bench_preset(name, shape, args)]
    print_table(rows)
    print_targets(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "args": {k: v for k, v in vars(args).items() if k != "shapes"},
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
