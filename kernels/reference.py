"""Plain PyTorch memory-augmented SwiGLU FFN: the reference the Triton kernels are checked against.

For one sequence ``b`` (docs/design.md, "The memory, exactly")::

    y_b = [W_down | U_down_b] · (silu([W_gate; U_gate_b] x_b) ⊙ [W_up; U_up_b] x_b)

which equals the shared anchor FFN plus a per-sequence memory FFN. Autograd gives every gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)  # fp64: an exact reference for tests


def check_memory_ffn_inputs(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    u_gate: torch.Tensor,
    u_up: torch.Tensor,
    u_down: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] = REFERENCE_DTYPES,
) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes (one of ``dtypes``, shared) and devices; return ``(B, T, d, h, M)``."""
    named = {"x": x, "w_gate": w_gate, "w_up": w_up, "w_down": w_down,
             "u_gate": u_gate, "u_up": u_up, "u_down": u_down}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"memory_ffn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"memory_ffn: x must be [B, T, d], got shape {tuple(x.shape)}")
    B, T, d = x.shape
    if w_gate.dim() != 2 or w_gate.shape[1] != d:
        raise ValueError(f"memory_ffn: w_gate must be [h, d] with d={d} (x is {tuple(x.shape)}), "
                         f"got {tuple(w_gate.shape)}")
    h = w_gate.shape[0]
    if u_gate.dim() != 3 or u_gate.shape[0] != B or u_gate.shape[2] != d:
        raise ValueError(f"memory_ffn: u_gate must be [B, M, d] = [{B}, M, {d}] (x is {tuple(x.shape)}), "
                         f"got {tuple(u_gate.shape)}")
    M = u_gate.shape[1]
    expected = {"w_up": (h, d), "w_down": (d, h), "u_up": (B, M, d), "u_down": (B, d, M)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"memory_ffn: {name} must have shape {shape}, got {tuple(named[name].shape)} "
                f"(x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, u_gate {tuple(u_gate.shape)})")
    got = {name: t.dtype for name, t in named.items()}
    if len(set(got.values())) != 1:
        raise ValueError(f"memory_ffn: all inputs must share one dtype, got {got}")
    if x.dtype not in dtypes:
        raise ValueError(f"memory_ffn: dtype {x.dtype} is not supported here; use one of {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"memory_ffn: all inputs must be on one device, got {devices}")
    return B, T, d, h, M


def memory_ffn_torch(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    u_gate: torch.Tensor,
    u_up: torch.Tensor,
    u_down: torch.Tensor,
) -> torch.Tensor:
    """Anchor SwiGLU FFN plus per-sequence memory SwiGLU FFN; shapes as in ``hmtrain_kernels.memory_ffn``."""
    check_memory_ffn_inputs(x, w_gate, w_up, w_down, u_gate, u_up, u_down)
    anchor = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
    # bmm with per-sequence weights: [B, T, d] x [B, d, M] -> [B, T, M]; M = 0 gives zeros.
    mem_gate = torch.bmm(x, u_gate.transpose(1, 2))
    mem_up = torch.bmm(x, u_up.transpose(1, 2))
    memory = torch.bmm(F.silu(mem_gate) * mem_up, u_down.transpose(1, 2))
    return anchor + memory
