"""Causal attention that never crosses a document, by SDPA with a dense mask or by FlexAttention.

A packed row holds several documents; `segments` [B, T] numbers them (padding is a segment of its
own). A query attends to keys at or before it in the same segment. Two implementations
(`model.attention`):

- `sdpa`: `F.scaled_dot_product_attention` with a dense [B, 1, T, T] boolean mask. Runs anywhere,
  but the mask rules out the flash kernels and every cross-document block is still computed.
- `flex`: `torch.nn.attention.flex_attention` with a BlockMask built from the same rule, so blocks
  that cross documents are skipped. On CUDA both the mask and the attention are compiled (fused
  Triton kernels); elsewhere torch runs its unfused reference, forward only.

`auto` is `flex` on CUDA (head_dim >= 16, the Triton kernels' minimum) and `sdpa` elsewhere.
On CPU, torch 2.13's FlexAttention has no backward (eager or compiled: NotImplementedError), so it
cannot train there; for the forward, `python -m hmtrain.bench.attention` measured (1 thread,
4 x 4 heads x 256 x 32, ~5 documents per row) the eager path 20x slower than SDPA with the dense
mask, and the compiled one 1.07x SDPA's time after 12.7 s of compilation (2.2x faster at 2 x 1,024
tokens, after 8 s). `flex` on CPU stays selectable, forward only, to check the flex path.
Without segments (one document per row) both use SDPA's `is_causal=True`.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from hmtrain.config import Attention

ATTENTION_IMPLS = Attention.values()
# devices where torch's FlexAttention has a backward pass (torch 2.13: not CPU, not MPS)
FLEX_BACKWARD_DEVICES = frozenset({"cuda", "xpu", "hpu"})
FLEX_MIN_HEAD_DIM = 16  # tl.dot in the compiled kernels

# What each layer receives: None (causal, one document per row), a dense mask, or a BlockMask.
DocumentMask = Optional[Union[Tensor, BlockMask]]


def resolve_attention(name: str, device: torch.device | str, head_dim: int) -> str:
    """Map `model.attention` (auto | flex | sdpa) to the implementation that runs on `device`."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        return "flex" if device.type == "cuda" and head_dim >= FLEX_MIN_HEAD_DIM else "sdpa"
    if name == "flex" and device.type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM:
        raise ValueError(f"model.attention='flex' needs model.head_dim >= {FLEX_MIN_HEAD_DIM} on CUDA, "
                         f"got {head_dim}; use model.attention=sdpa or auto")
    return name


def document_mask(segments: Tensor) -> Tensor:
    """[B, 1, T, T] boolean: causal and within the same document."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same_doc = segments[:, :, None] == segments[:, None, :]
    return (same_doc & causal)[:, None]


@functools.cache
def _compiled_create_block_mask():
    # Compiled, the mask_mod is evaluated block by block instead of over a dense [B, T, T] tensor.
    return torch.compile(create_block_mask)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(segments: Tensor) -> BlockMask:
    """The FlexAttention BlockMask of `document_mask(segments)`: blocks across documents are skipped."""
    B, T = segments.shape

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    create = _compiled_create_block_mask() if segments.device.type == "cuda" else create_block_mask
    return create(same_document_causal, B, None, T, T, device=segments.device)


def build_mask(segments: Optional[Tensor], impl: str) -> DocumentMask:
    """The mask for one forward pass, shared by every layer; `impl` is a resolved name (flex | sdpa)."""
    if segments is None:
        return None
    if impl == "sdpa":
        return document_mask(segments)
    if torch.is_grad_enabled() and segments.device.type not in FLEX_BACKWARD_DEVICES:
        raise ValueError(
            f"model.attention='flex' cannot train on {segments.device.type}: torch's FlexAttention has no "
            f"backward there; run under torch.no_grad() or use model.attention=auto or sdpa")
    return document_block_mask(segments)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: DocumentMask) -> Tensor:
    """q, k, v [B, H, T, hd] -> [B, H, T, hd], causal and inside documents as `mask` says."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, BlockMask):
        run = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
        return run(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
