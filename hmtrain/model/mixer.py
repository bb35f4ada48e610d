"""The masked-mixer block (Badger 2024, 2026): attention replaced by a learned causal token-mixing matrix.

    x = x + M_masked . norm(x)          M: [length, length], lower-triangular (position i mixes j <= i)
    x = x + SwiGLU(norm(x))

Every position gets its own mixing weights, so a mixer has a fixed `length`; a shorter input uses the
top-left corner of M (still causal, since row i only reads columns j <= i). No heads, no RoPE: the
matrix itself is positional. Initialised like the paper's `Conv1d(length, length, 1)`:
uniform in +-1/sqrt(length), then masked.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmtrain.model.transformer import RMSNorm


class MaskedMixerBlock(nn.Module):
    def __init__(self, d_model: int, length: int, ffn_hidden: int, norm_eps: float = 1e-5):
        super().__init__()
        if length < 1:
            raise ValueError(f"a masked mixer needs length >= 1, got {length}")
        self.length = length
        self.mix_norm = RMSNorm(d_model, norm_eps)
        self.mix = nn.Parameter(torch.empty(length, length))
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = _SwiGLU(d_model, ffn_hidden)
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).tril(), persistent=False)
        self.reset_mixing()

    def reset_mixing(self) -> None:
        bound = 1.0 / math.sqrt(self.length)
        with torch.no_grad():
            self.mix.uniform_(-bound, bound)

    def mixing_matrix(self, length: int) -> Tensor:
        """The masked [length, length] matrix actually applied (zero above the diagonal)."""
        if length > self.length:
            raise ValueError(f"a masked mixer of length {self.length} got a sequence of {length} tokens")
        return (self.mix * self.causal)[:length, :length]

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
        T = x.shape[1]
        mixed = torch.einsum("ij,bjd->bid", self.mixing_matrix(T).to(x.dtype), self.mix_norm(x))
        x = x + mixed
        return x + self.ffn(self.ffn_norm(x))


class _SwiGLU(nn.Module):
    """The anchor's SwiGLU FFN (same parameter names), without the memory path."""

    def __init__(self, d_model: int, ffn_hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_up = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_down = nn.Linear(ffn_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
