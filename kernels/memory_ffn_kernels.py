"""Triton kernels of the memory-augmented SwiGLU FFN (launchers in ``hmtrain_kernels.memory_ffn_triton``).

Every kernel sees the hidden dimension as the concatenation ``[h | M]`` of the anchor's units and
the sequence's memory units. A tile lies wholly in one part, so the weight source (shared ``W`` or
per-sequence ``U_b``) is picked once per program and the inner loop is a plain tiled matmul.

Layouts (all contiguous, row-major): x, dy [B*T, d]; activations a, g, u [B*T, h+M];
w_gate, w_up [h, d]; w_down [d, h]; u_gate, u_up [B, M, d]; u_down [B, d, M].
Integer selects use arithmetic on ``is_mem`` rather than if/else: Triton may specialise an int
argument equal to 1 as a constant, and a branch yielding a constant on one side and a tensor on
the other does not type-check. Each tile's start is an int64 scalar (B*T*(h+M) may exceed 2**31)
and offsets inside a tile are int32, which keeps address math out of the register budget.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # triton >= 3.2 keeps settings in knobs; older ones read the environment
    from triton import knobs as _knobs

    INTERPRET: bool = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Triton's interpreter stores bf16 as raw uint16 and its tl.dot multiplies those bit patterns
# (triton 3.9; triton-lang/triton#11584), so under the interpreter operands are upcast to fp32
# first: bf16 products are exact in fp32, as on tensor cores. On a GPU tl.dot gets them unchanged.
# Elsewhere bf16 is only loaded, stored and cast to or from fp32, which the interpreter handles.
_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if _UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _grouped(pid, n_row_tiles, n_col_tiles, GROUP: tl.constexpr):
    """Map a 1-D program id to (row tile, column tile), GROUP row tiles at a time, so programs that
    run together share their weight and activation tiles in L2 (as in Triton's matmul tutorial)."""
    width = GROUP * n_col_tiles
    first = (pid // width) * GROUP
    size = tl.minimum(n_row_tiles - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _row_tile(pid_row, T, BLOCK_T: tl.constexpr):
    """(sequence b, first global row as int64, in-tile row offsets, row mask) of a row tile."""
    n_row_tiles = tl.cdiv(T, BLOCK_T)
    b = pid_row // n_row_tiles
    t0 = (pid_row % n_row_tiles) * BLOCK_T
    offs_t = tl.arange(0, BLOCK_T)
    return b, b.to(tl.int64) * T + t0, offs_t, offs_t < T - t0


@triton.jit
def gate_up_fwd_kernel(
    x_ptr, wg_ptr, wu_ptr, ug_ptr, uu_ptr, a_ptr, g_ptr, u_ptr,
    B, T, d, h, M,
    SAVE_GU: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """a = silu(x [W_gate; U_gate_b]^T) * (x [W_up; U_up_b]^T), both projections in one pass over x."""
    n_anchor_tiles = tl.cdiv(h, BLOCK_H)
    n_col_tiles = n_anchor_tiles + tl.cdiv(M, BLOCK_H)
    pid_row, pid_col = _grouped(tl.program_id(0), B * tl.cdiv(T, BLOCK_T), n_col_tiles, GROUP)
    b, row0, offs_t, t_mask = _row_tile(pid_row, T, BLOCK_T)
    is_mem = (pid_col >= n_anchor_tiles).to(tl.int32)
    offs_h = (pid_col - is_mem * n_anchor_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    n_cols = h + is_mem * (M - h)
    if pid_col < n_anchor_tiles:
        wg_base = wg_ptr
        wu_base = wu_ptr
    else:
        wg_base = ug_ptr + b.to(tl.int64) * M * d
        wu_base = uu_ptr + b.to(tl.int64) * M * d
    h_mask = offs_h < n_cols
    x_base = x_ptr + row0 * d
    acc_g = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d
        x = tl.load(x_base + offs_t[:, None] * d + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w_off = offs_h[None, :] * d + offs_k[:, None]  # [K, H] view of the [H, d] weight
        w_mask = k_mask[:, None] & h_mask[None, :]
        wg = tl.load(wg_base + w_off, mask=w_mask, other=0.0)
        wu = tl.load(wu_base + w_off, mask=w_mask, other=0.0)
        acc_g = _mma(x, wg, acc_g, PRECISION)
        acc_u = _mma(x, wu, acc_u, PRECISION)
    H = h + M
    out_off = offs_t[:, None] * H + (offs_h + is_mem * h)[None, :]
    out_mask = t_mask[:, None] & h_mask[None, :]
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(a_ptr + row0 * H + out_off, act.to(a_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_GU:
        tl.store(g_ptr + row0 * H + out_off, acc_g.to(g_ptr.dtype.element_ty), mask=out_mask)
        tl.store(u_ptr + row0 * H + out_off, acc_u.to(u_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def down_fwd_kernel(
    a_ptr, wd_ptr, ud_ptr, y_ptr,
    B, T, d, h, M,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """y = a[:, :h] W_down^T + a[:, h:] U_down_b^T: one accumulator over the whole [h | M] width."""
    pid_row, pid_n = _grouped(tl.program_id(0), B * tl.cdiv(T, BLOCK_T), tl.cdiv(d, BLOCK_N), GROUP)
    b, row0, offs_t, t_mask = _row_tile(pid_row, T, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d
    H = h + M
    a_rows = a_ptr + row0 * H + offs_t[:, None] * H
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, h, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < h
        a = tl.load(a_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(wd_ptr + offs_n[None, :] * h + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, w, acc, PRECISION)
    ud_base = ud_ptr + b.to(tl.int64) * d * M
    for k0 in range(0, M, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < M
        a = tl.load(a_rows + h + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(ud_base + offs_n[None, :] * M + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, w, acc, PRECISION)
    tl.store(y_ptr + row0 * d + offs_t[:, None] * d + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def act_bwd_kernel(
    dy_ptr, wd_ptr, ud_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,
    B, T, d, h, M,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """da = dy [W_down | U_down_b]; then dg, du of silu(g)*u in the epilogue (da never hits memory)."""
    n_anchor_tiles = tl.cdiv(h, BLOCK_H)
    n_col_tiles = n_anchor_tiles + tl.cdiv(M, BLOCK_H)
    pid_row, pid_col = _grouped(tl.program_id(0), B * tl.cdiv(T, BLOCK_T), n_col_tiles, GROUP)
    b, row0, offs_t, t_mask = _row_tile(pid_row, T, BLOCK_T)
    is_mem = (pid_col >= n_anchor_tiles).to(tl.int32)
    offs_h = (pid_col - is_mem * n_anchor_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    n_cols = h + is_mem * (M - h)  # also the row stride of the [d, n_cols] down weight
    if pid_col < n_anchor_tiles:
        w_base = wd_ptr
    else:
        w_base = ud_ptr + b.to(tl.int64) * d * M
    h_mask = offs_h < n_cols
    dy_base = dy_ptr + row0 * d
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d
        dy = tl.load(dy_base + offs_t[:, None] * d + offs_k[None, :],
                     mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + offs_k[:, None] * n_cols + offs_h[None, :],
                    mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        acc = _mma(dy, w, acc, PRECISION)
    H = h + M
    tile = row0 * H  # int64 scalar added to each base first, so the per-element offsets stay int32
    off = offs_t[:, None] * H + (offs_h + is_mem * h)[None, :]
    mask = t_mask[:, None] & h_mask[None, :]
    g = tl.load(g_ptr + tile + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + tile + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    dg = acc * u * sig * (1.0 + g * (1.0 - sig))
    du = acc * g * sig
    tl.store(dg_ptr + tile + off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + tile + off, du.to(du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def x_bwd_kernel(
    dg_ptr, du_ptr, wg_ptr, wu_ptr, ug_ptr, uu_ptr, dx_ptr,
    B, T, d, h, M,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dx = dg [W_gate; U_gate_b] + du [W_up; U_up_b]: four products into one accumulator."""
    pid_row, pid_n = _grouped(tl.program_id(0), B * tl.cdiv(T, BLOCK_T), tl.cdiv(d, BLOCK_N), GROUP)
    b, row0, offs_t, t_mask = _row_tile(pid_row, T, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d
    H = h + M
    dg_rows = dg_ptr + row0 * H
    du_rows = du_ptr + row0 * H
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, h, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < h
        a_off = offs_t[:, None] * H + offs_k[None, :]
        a_mask = t_mask[:, None] & k_mask[None, :]
        w_off = offs_k[:, None] * d + offs_n[None, :]
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc = _mma(tl.load(dg_rows + a_off, mask=a_mask, other=0.0),
                   tl.load(wg_ptr + w_off, mask=w_mask, other=0.0), acc, PRECISION)
        acc = _mma(tl.load(du_rows + a_off, mask=a_mask, other=0.0),
                   tl.load(wu_ptr + w_off, mask=w_mask, other=0.0), acc, PRECISION)
    ug_base = ug_ptr + b.to(tl.int64) * M * d
    uu_base = uu_ptr + b.to(tl.int64) * M * d
    for k0 in range(0, M, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < M
        a_off = offs_t[:, None] * H + h + offs_k[None, :]
        a_mask = t_mask[:, None] & k_mask[None, :]
        w_off = offs_k[:, None] * d + offs_n[None, :]
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc = _mma(tl.load(dg_rows + a_off, mask=a_mask, other=0.0),
                   tl.load(ug_base + w_off, mask=w_mask, other=0.0), acc, PRECISION)
        acc = _mma(tl.load(du_rows + a_off, mask=a_mask, other=0.0),
                   tl.load(uu_base + w_off, mask=w_mask, other=0.0), acc, PRECISION)
    tl.store(dx_ptr + row0 * d + offs_t[:, None] * d + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _wgrad_item(pid_w, T, h, M, n_rows, rows_per_split, n_splits, BLOCK_J: tl.constexpr):
    """Decode a weight-gradient work item.

    Anchor items (split s, column tile) come first: split s reduces rows [s*rows_per_split, ...)
    into slice s of the output (an fp32 buffer the launcher sums when there are several splits),
    so the reduction over all B*T rows fills the GPU without atomics. Memory items are
    (sequence b, column tile) and reduce over b's T rows. Returns (is_mem, split or sequence,
    column offsets, columns in this part, first row, end row).
    """
    n_h_tiles = tl.cdiv(h, BLOCK_J)
    n_anchor_work = n_splits * n_h_tiles
    is_mem = (pid_w >= n_anchor_work).to(tl.int32)
    w = pid_w - is_mem * n_anchor_work
    n_tiles = n_h_tiles + is_mem * (tl.cdiv(M, BLOCK_J) - n_h_tiles)
    grp = w // n_tiles
    offs_j = (w % n_tiles) * BLOCK_J + tl.arange(0, BLOCK_J)
    rows_len = rows_per_split + is_mem * (T - rows_per_split)
    row_start = grp * rows_len
    return is_mem, grp, offs_j, h + is_mem * (M - h), row_start, tl.minimum(row_start + rows_len, n_rows)


@triton.jit
def down_wgrad_kernel(
    dy_ptr, a_ptr, dwd_ptr, dud_ptr,
    T, d, h, M, n_rows, rows_per_split, split_stride, n_splits, n_mem_seqs,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dW_down[n, j] = sum over rows of dy[r, n] a[r, j]; dU_down_b the same over sequence b's rows."""
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    is_mem, grp, offs_j, n_cols, row_start, row_end = _wgrad_item(
        pid_w, T, h, M, n_rows, rows_per_split, n_splits, BLOCK_J)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < d
    j_mask = offs_j < n_cols
    H = h + M
    start = row_start.to(tl.int64)
    dy_ptrs = dy_ptr + start * d + (offs_r[None, :] * d + offs_n[:, None])  # [N, R] view of dy
    a_ptrs = a_ptr + start * H + (offs_r[:, None] * H + (offs_j + is_mem * h)[None, :])
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        r_mask = offs_r < row_end - r0
        dy_t = tl.load(dy_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=r_mask[:, None] & j_mask[None, :], other=0.0)
        acc = _mma(dy_t, a, acc, PRECISION)
        dy_ptrs += BLOCK_R * d
        a_ptrs += BLOCK_R * H
    out_off = offs_n[:, None] * n_cols + offs_j[None, :]
    out_mask = n_mask[:, None] & j_mask[None, :]
    # outputs differ in dtype (fp32 split partials vs the weights' dtype): store in each branch,
    # a pointer variable of either type would not type-check
    if pid_w < n_splits * tl.cdiv(h, BLOCK_J):
        tl.store(dwd_ptr + grp.to(tl.int64) * split_stride + out_off, acc.to(dwd_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        tl.store(dud_ptr + grp.to(tl.int64) * d * M + out_off, acc.to(dud_ptr.dtype.element_ty),
                 mask=out_mask)


@triton.jit
def gate_up_wgrad_kernel(
    dg_ptr, du_ptr, x_ptr, dwg_ptr, dwu_ptr, dug_ptr, duu_ptr,
    T, d, h, M, n_rows, rows_per_split, split_stride, n_splits, n_mem_seqs,
    PRECISION: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dW_gate[j, k] = sum_r dg[r, j] x[r, k] and dW_up likewise, sharing each x tile; work items
    and splits as in ``down_wgrad_kernel``."""
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    is_mem, grp, offs_j, n_cols, row_start, row_end = _wgrad_item(
        pid_w, T, h, M, n_rows, rows_per_split, n_splits, BLOCK_J)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < d
    j_mask = offs_j < n_cols
    H = h + M
    start = row_start.to(tl.int64)
    act_off = start * H + (offs_r[None, :] * H + (offs_j + is_mem * h)[:, None])  # [J, R] view
    dg_ptrs = dg_ptr + act_off
    du_ptrs = du_ptr + act_off
    x_ptrs = x_ptr + start * d + (offs_r[:, None] * d + offs_n[None, :])
    acc_g = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_J, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        r_mask = offs_r < row_end - r0
        act_mask = j_mask[:, None] & r_mask[None, :]
        x = tl.load(x_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc_g = _mma(tl.load(dg_ptrs, mask=act_mask, other=0.0), x, acc_g, PRECISION)
        acc_u = _mma(tl.load(du_ptrs, mask=act_mask, other=0.0), x, acc_u, PRECISION)
        dg_ptrs += BLOCK_R * H
        du_ptrs += BLOCK_R * H
        x_ptrs += BLOCK_R * d
    out_off = offs_j[:, None] * d + offs_n[None, :]
    out_mask = j_mask[:, None] & n_mask[None, :]
    if pid_w < n_splits * tl.cdiv(h, BLOCK_J):
        base = grp.to(tl.int64) * split_stride
        tl.store(dwg_ptr + base + out_off, acc_g.to(dwg_ptr.dtype.element_ty), mask=out_mask)
        tl.store(dwu_ptr + base + out_off, acc_u.to(dwu_ptr.dtype.element_ty), mask=out_mask)
    else:
        base = grp.to(tl.int64) * M * d
        tl.store(dug_ptr + base + out_off, acc_g.to(dug_ptr.dtype.element_ty), mask=out_mask)
        tl.store(duu_ptr + base + out_off, acc_u.to(duu_ptr.dtype.element_ty), mask=out_mask)
