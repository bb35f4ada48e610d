"""Kernels for the memory-augmented FFN (anchor SwiGLU + per-sequence fetched memory units).

``import hmtrain_kernels`` never imports triton: the Triton implementation is loaded on first use of
``impl="triton"``, so CPU-only code paths work without it.
"""
from __future__ import annotations

import importlib
import os

import torch

from hmtrain_kernels.reference import check_memory_ffn_inputs, memory_ffn_torch

IMPLS = ("auto", "torch", "triton")

__all__ = ["memory_ffn", "memory_ffn_torch", "resolve_impl", "check_memory_ffn_inputs", "IMPLS"]


def _triton_import_error() -> str | None:
    """Why triton cannot be imported, or None when it can."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_impl(name: str, device: torch.device | str) -> str:
    """Map an impl name ("auto" | "torch" | "triton") to the one that runs on ``device``.

    "auto" is "torch" on every device: the Triton kernels have passed their tests only under the
    interpreter and have never run on a GPU. A GPU run of ``python -m hmtrain.bench.memory_ffn``
    showing them correct and faster (recorded in docs/benchmarks.md) is what may flip this.
    "triton" raises a RuntimeError saying why when it cannot run (no triton, or CPU tensors without
    TRITON_INTERPRET=1).
    """
    if name not in IMPLS:
        raise ValueError(f"memory_ffn impl must be one of {IMPLS}, got {name!r}")
    device = torch.device(device)
    if name in ("torch", "auto"):
        return "torch"
    error = _triton_import_error()
    if error is not None:
        raise RuntimeError(f"memory_ffn impl='triton' needs triton, which cannot be imported ({error}); "
                           "use impl='torch' or 'auto'")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "memory_ffn impl='triton' got CPU tensors; Triton runs on CPU only in its interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported, or use impl='torch'")
        return "triton"
    if device.type != "cuda":
        raise RuntimeError(f"memory_ffn impl='triton' supports CUDA (or CPU under TRITON_INTERPRET=1), "
                           f"got device {device}; use impl='torch'")
    return "triton"


def memory_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    u_gate: torch.Tensor,
    u_up: torch.Tensor,
    u_down: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Memory-augmented SwiGLU FFN, differentiable in every input.

    x [B, T, d]; anchor (nn.Linear layout) w_gate, w_up [h, d], w_down [d, h];
    per-sequence memory u_gate, u_up [B, M, d], u_down [B, d, M]. Returns [B, T, d]:
    ``(silu(x w_gate^T) * (x w_up^T)) w_down^T`` plus, per sequence b,
    ``(silu(x_b u_gate_b^T) * (x_b u_up_b^T)) u_down_b^T``.
    """
    if resolve_impl(impl, x.device) == "torch":
        return memory_ffn_torch(x, w_gate, w_up, w_down, u_gate, u_up, u_down)
    from hmtrain_kernels.memory_ffn_triton import memory_ffn_triton  # lazy: imports triton

    return memory_ffn_triton(x, w_gate, w_up, w_down, u_gate, u_up, u_down)
