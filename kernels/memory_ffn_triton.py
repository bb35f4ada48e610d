"""Triton implementation of ``memory_ffn``: launchers and the autograd Function.

Passes (N = B*T rows, H = h + M hidden units, each over the concatenated ``[h | M]`` width):

  forward   1. gate_up_fwd   x -> a = silu(g) * u   (g, u kept for backward)
            2. down_fwd      a -> y
  backward  3. act_bwd       dy -> da -> dg, du      (da stays in registers)
            4. x_bwd         dg, du -> dx
            5. down_wgrad    dy, a -> dW_down (summed over sequences), dU_down_b
            6. gate_up_wgrad dg, du, x -> dW_gate, dW_up, dU_gate_b, dU_up_b

This is the minimum: the 3 forward and 6 backward GEMMs of a SwiGLU FFN with the elementwise
work fused into their epilogues, and anchor and memory units handled by the same launches.
Importing this module imports triton; ``hmtrain_kernels.memory_ffn`` imports it only for impl="triton".
"""
from __future__ import annotations

from typing import Callable

import torch
import triton

from hmtrain_kernels.memory_ffn_kernels import (
    INTERPRET,
    act_bwd_kernel,
    down_fwd_kernel,
    down_wgrad_kernel,
    gate_up_fwd_kernel,
    gate_up_wgrad_kernel,
    x_bwd_kernel,
)
from hmtrain_kernels.reference import KERNEL_DTYPES, check_memory_ffn_inputs

_SHAPE_KEY = ["B", "T", "d", "h", "M"]
_WGRAD_KEY = ["T", "d", "h", "M", "n_rows", "n_splits", "n_mem_seqs"]


def _configs(names: tuple[str, str, str], big_tiles: bool, grouped: bool = True) -> list[triton.Config]:
    """Autotune candidates on a GPU; one small config under the interpreter (no benchmarking).

    ``big_tiles`` adds 128x256 / 256x128 output tiles, for kernels that keep a single fp32 tile
    live; two accumulators (or an epilogue holding g and u too) that size would spill registers.
    """
    if INTERPRET:  # GROUP 2 so the tiny test shapes still span several program groups
        return [triton.Config(dict(zip(names, (16, 16, 16)), **({"GROUP": 2} if grouped else {})))]
    group = {"GROUP": 8} if grouped else {}
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
              (128, 128, 32, 8, 4), (64, 64, 64, 4, 3)]
    if big_tiles:
        shapes += [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]
    return [triton.Config(dict(zip(names, s[:3]), **group), num_warps=s[3], num_stages=s[4]) for s in shapes]


def _smem_pruner(names: tuple[str, str, str], operands: Callable[[int, int, int], int]):
    """Drop configs whose pipelined operand tiles overflow shared memory (autotuning would compile
    them only to fail). ``operands(b0, b1, b2)`` = elements one pipeline stage loads."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        tensor = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
        props = torch.cuda.get_device_properties(tensor.device)
        limit = getattr(props, "shared_memory_per_block_optin", 232448)

        def need(c: triton.Config) -> int:
            return c.num_stages * operands(*(c.kwargs[n] for n in names)) * tensor.element_size()

        fits = [c for c in configs if need(c) <= limit]
        return fits or [min(configs, key=need)]

    return {"early_config_prune": prune}


def _tune(kernel, names: tuple[str, str, str], big_tiles: bool, key: list[str],
          operands: Callable[[int, int, int], int], grouped: bool = True):
    if INTERPRET:
        return triton.autotune(_configs(names, big_tiles, grouped), key=key)(kernel)
    return triton.autotune(_configs(names, big_tiles, grouped), key=key,
                           prune_configs_by=_smem_pruner(names, operands))(kernel)


_ROWS_H, _ROWS_D = ("BLOCK_T", "BLOCK_H", "BLOCK_K"), ("BLOCK_T", "BLOCK_N", "BLOCK_K")
# operands per stage: gate_up_fwd x + 2 weights; x_bwd 2 activations + 2 weights; gate_up_wgrad
# x + dg + du; the others one tile of each side
_gate_up_fwd = _tune(gate_up_fwd_kernel, _ROWS_H, False, _SHAPE_KEY, lambda t, n, k: t * k + 2 * k * n)
_down_fwd = _tune(down_fwd_kernel, _ROWS_D, True, _SHAPE_KEY, lambda t, n, k: t * k + k * n)
_act_bwd = _tune(act_bwd_kernel, _ROWS_H, False, _SHAPE_KEY, lambda t, n, k: t * k + k * n)
_x_bwd = _tune(x_bwd_kernel, _ROWS_D, True, _SHAPE_KEY, lambda t, n, k: 2 * (t * k + k * n))
_down_wgrad = _tune(down_wgrad_kernel, ("BLOCK_N", "BLOCK_J", "BLOCK_R"), True, _WGRAD_KEY,
                    lambda n, j, r: n * r + r * j, grouped=False)
_gate_up_wgrad = _tune(gate_up_wgrad_kernel, ("BLOCK_J", "BLOCK_N", "BLOCK_R"), False, _WGRAD_KEY,
                       lambda j, n, r: 2 * j * r + r * n, grouped=False)


def _empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Allocate a kernel output; every element must be written by a kernel (tests poison this)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _precision(dtype: torch.dtype) -> str:
    """Match torch's matmul precision: fp32 stays IEEE unless TF32 is switched on globally."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # triton's default; it only affects fp32 operands


def anchor_splits(n_rows: int, h: int, d: int, device: torch.device) -> int:
    """How many row slices the shared-weight gradients are reduced in.

    A [d, h] gradient has only (d/128)*(h/128) output tiles (64 at d=512, h=2048), too few to fill
    an H100 when each reduces over all B*T rows; splitting rows gives every SM work, at the cost of
    an fp32 partial per split summed afterwards. Each slice keeps >= 1024 rows to stay GEMM-bound.
    """
    if device.type != "cuda" or n_rows == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(h, 128) * triton.cdiv(d, 128)
    return max(1, min(triton.cdiv(sms, max(tiles, 1)), n_rows // 1024))


def _split_rows(n_rows: int, splits: int) -> tuple[int, int]:
    """(rows per split, number of non-empty splits); slices are whole multiples of 16 rows."""
    per = triton.cdiv(triton.cdiv(n_rows, max(splits, 1)), 16) * 16
    return per, triton.cdiv(n_rows, per)


def _nonempty(t: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Empty memories (M = 0) have no storage to point at; the kernels never read them then."""
    return t if t.numel() > 0 else fallback


def _forward(x, wg, wu, wd, ug, uu, ud, save: bool):
    B, T, d = x.shape
    h, M = wg.shape[0], ug.shape[1]
    H = h + M
    a = _empty((B, T, H), x)
    g = _empty((B, T, H), x) if save else a
    u = _empty((B, T, H), x) if save else a
    y = _empty((B, T, d), x)
    if B * T == 0 or d == 0:
        return y.zero_(), a, g, u
    prec = _precision(x.dtype)
    ug_, uu_, ud_ = (_nonempty(t, wg) for t in (ug, uu, ud))
    if H > 0:
        grid = lambda m: (B * triton.cdiv(T, m["BLOCK_T"])  # noqa: E731
                          * (triton.cdiv(h, m["BLOCK_H"]) + triton.cdiv(M, m["BLOCK_H"])),)
        _gate_up_fwd[grid](x, wg, wu, ug_, uu_, a, g, u, B, T, d, h, M, SAVE_GU=save, PRECISION=prec)
    grid = lambda m: (B * triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(d, m["BLOCK_N"]),)  # noqa: E731
    _down_fwd[grid](a, wd, ud_, y, B, T, d, h, M, PRECISION=prec)
    return y, a, g, u


def _wgrad(kernel, inputs: tuple, anchor_outs: list | None, mem_outs: list | None, n_outs: int,
           shape: tuple[int, ...], fallback: torch.Tensor) -> None:
    """Run a weight-gradient kernel with ``n_outs`` anchor (shared) and ``n_outs`` memory
    (per-sequence) outputs. A group given as None is skipped: no work item targets it, so the
    kernel gets ``fallback`` pointers that it never writes. A group that is given is written whole.
    """
    B, T, d, h, M = shape
    n_rows = B * T
    splits = anchor_splits(n_rows, h, d, fallback.device) if anchor_outs and h > 0 and n_rows > 0 else 0
    per, splits = _split_rows(n_rows, splits) if splits else (n_rows, 0)
    mem_seqs = B if mem_outs and M > 0 else 0
    if splits > 1:  # fp32 partials, summed below, so the split reduction loses nothing
        anchor_ptrs = [_empty((splits, *o.shape), fallback, torch.float32) for o in anchor_outs]
        stride = anchor_outs[0].numel()
    else:
        anchor_ptrs, stride = anchor_outs or [fallback] * n_outs, 0
    mem_ptrs = [_nonempty(o, fallback) for o in mem_outs] if mem_outs else [fallback] * n_outs
    if splits + mem_seqs > 0 and d > 0:
        grid = lambda m: (triton.cdiv(d, m["BLOCK_N"]),  # noqa: E731
                          splits * triton.cdiv(h, m["BLOCK_J"]) + mem_seqs * triton.cdiv(M, m["BLOCK_J"]))
        kernel[grid](*inputs, *anchor_ptrs, *mem_ptrs, T, d, h, M, n_rows, per, stride, splits,
                     mem_seqs, PRECISION=_precision(fallback.dtype))
    for out, buf in zip(anchor_outs or [], anchor_ptrs):
        if splits > 1:
            out.copy_(buf.sum(dim=0))
        elif splits == 0 or d == 0:
            out.zero_()  # empty sum: no rows, h == 0 or d == 0
    for out in mem_outs or []:
        if mem_seqs == 0 or d == 0:
            out.zero_()


def _backward(dy, x, wg, wu, wd, ug, uu, ud, a, g, u, need: tuple[bool, ...]) -> list:
    B, T, d = x.shape
    h, M = wg.shape[0], ug.shape[1]
    H, n_rows = h + M, B * T
    shape = (B, T, d, h, M)
    prec = _precision(x.dtype)
    ug_, uu_, ud_ = (_nonempty(t, wg) for t in (ug, uu, ud))
    need_x, need_wg, need_wu, need_wd, need_ug, need_uu, need_ud = need
    grads: list[torch.Tensor | None] = [None] * 7
    if need_wd or need_ud:
        grads[3] = _empty(wd.shape, wd) if need_wd else None
        grads[6] = _empty(ud.shape, ud) if need_ud else None
        _wgrad(_down_wgrad, (dy, a), [grads[3]] if need_wd else None, [grads[6]] if need_ud else None,
               1, shape, wd)
    need_w, need_mem = need_wg or need_wu, need_ug or need_uu
    if not (need_x or need_w or need_mem):
        return grads
    dg, du = _empty((B, T, H), x), _empty((B, T, H), x)
    if n_rows > 0 and H > 0:
        grid = lambda m: (B * triton.cdiv(T, m["BLOCK_T"])  # noqa: E731
                          * (triton.cdiv(h, m["BLOCK_H"]) + triton.cdiv(M, m["BLOCK_H"])),)
        _act_bwd[grid](dy, wd, ud_, g, u, dg, du, B, T, d, h, M, PRECISION=prec)
    if need_x:
        grads[0] = _empty(x.shape, x)
        if n_rows > 0 and d > 0:
            grid = lambda m: (B * triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(d, m["BLOCK_N"]),)  # noqa: E731
            _x_bwd[grid](dg, du, wg, wu, ug_, uu_, grads[0], B, T, d, h, M, PRECISION=prec)
    if need_w or need_mem:
        # gate and up come from one kernel: if either is needed both are computed (same cost)
        anchor = [_empty(wg.shape, wg), _empty(wu.shape, wu)] if need_w else None
        memory = [_empty(ug.shape, ug), _empty(uu.shape, uu)] if need_mem else None
        _wgrad(_gate_up_wgrad, (dg, du, x), anchor, memory, 2, shape, wg)
        if need_w:
            grads[1], grads[2] = (anchor[0] if need_wg else None), (anchor[1] if need_wu else None)
        if need_mem:
            grads[4], grads[5] = (memory[0] if need_ug else None), (memory[1] if need_uu else None)
    return grads


class MemoryFFNFunction(torch.autograd.Function):
    """Autograd wrapper: shared-weight gradients sum over sequences, memory ones stay per sequence."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, u_gate, u_up, u_down):  # noqa: D102
        check_memory_ffn_inputs(x, w_gate, w_up, w_down, u_gate, u_up, u_down, KERNEL_DTYPES)
        if x.device.type == "cpu" and not INTERPRET:
            raise RuntimeError("memory_ffn triton kernels got CPU tensors but were compiled for GPU; "
                               "set TRITON_INTERPRET=1 before triton is first imported")
        tensors = [t.contiguous() for t in (x, w_gate, w_up, w_down, u_gate, u_up, u_down)]
        save = any(ctx.needs_input_grad)
        y, a, g, u = _forward(*tensors, save=save)
        if save:
            ctx.save_for_backward(*tensors, a, g, u)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        return tuple(_backward(dy.contiguous(), *ctx.saved_tensors, need=tuple(ctx.needs_input_grad)))


def memory_ffn_triton(x, w_gate, w_up, w_down, u_gate, u_up, u_down) -> torch.Tensor:
    """Triton ``memory_ffn``; shapes and semantics as in ``hmtrain_kernels.memory_ffn``.

    Under autocast every input is cast to the autocast dtype first, as autocast does for a matmul
    (fp32 master weights still get fp32 gradients, through the cast).
    """
    tensors = (x, w_gate, w_up, w_down, u_gate, u_up, u_down)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        tensors = tuple(t.to(dtype) for t in tensors)
    return MemoryFFNFunction.apply(*tensors)
