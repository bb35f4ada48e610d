"""The anchor transformer, with an optional per-sequence memory in every layer or in some (`memory_layers`).

Pre-norm decoder: gain-only RMSNorm, RoPE (positions restart at every document),
QK-norm over the full query/key projections (OpenLM), SwiGLU FFN, causal attention
that never crosses a document boundary (hmtrain/model/attention.py: FlexAttention or SDPA).
No parallelism lives here (see hmtrain/parallel).

With memory, layer i reads what its memory kind hands it (hmtrain/memory/kind.py, docs/memory-kinds.md):
- `FFNUnits` (memory.kind=ffn): the FFN is (docs/design.md, "The memory, exactly")
      y = [W_down | U_down_b] . (silu([W_gate; U_gate_b] x) * [W_up; U_up_b] x)
  computed by `hmtrain_kernels.memory_ffn`, where U_b are the blocks fetched for sequence b;
- `LoRABlocks` (lora_ffn, lora_qk, lora_ov): each adapted linear computes W x + scale * B_b (A_b x);
- `KVBlocks` (kv): every query also attends, with a softmax of its own and neither causal mask nor
  position, to sequence b's memory keys; the result is added to the attention's output before W_o.
Memory sits in the decoder layers `memory_layers` (config `memory.layers`; default all): the j-th of
them reads the fetched memory's layer slot j (`memory.layer(j)`), and every other layer runs without
memory, the plain anchor block.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmtrain.config import ModelConfig
from hmtrain.memory.kind import KVBlocks, LoRABlocks
from hmtrain.model.attention import DocumentMask, attend, build_mask, resolve_attention
from hmtrain.model.loss import lm_loss_sum
from hmtrain.util.labels import IGNORE_INDEX
from hmtrain_kernels import memory_ffn, resolve_impl


class LayerMemory(Protocol):
    """What the model needs from fetched memory: per memory layer slot, what the memory kind hands the
    forward (FFNUnits, or any (u_gate, u_up, u_down) tuple; LoRABlocks; KVBlocks)."""

    def layer(self, i: int) -> tuple: ...


def adapted(linear: nn.Linear, name: str, x: Tensor, lora: Optional[LoRABlocks]) -> Tensor:
    """linear(x), plus sequence b's low-rank update scale * (x A_b^T) B_b^T where `lora` adapts `name`."""
    y = linear(x)
    if lora is None or name not in lora.adapters:
        return y
    a, b_t = (t.to(x.dtype) for t in lora.adapters[name])  # [B, M, d_in], [B, M, d_out]
    return y + lora.scale * ((x @ a.transpose(1, 2)) @ b_t).to(y.dtype)


class RMSNorm(nn.Module):
    """Gain-only RMSNorm (no bias), computed in fp32 for stability under bf16."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_len: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def positions_in_document(segments: Tensor) -> Tensor:
    """Position of each token inside its document: RoPE restarts where a new segment begins."""
    T = segments.shape[1]
    index = torch.arange(T, device=segments.device).expand_as(segments)
    is_start = torch.ones_like(segments, dtype=torch.bool)
    is_start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - starts


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos/sin: [B or 1, 1, T, hd/2]. Rotates the two halves (NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, inner, bias=False)
        self.wk = nn.Linear(cfg.d_model, inner, bias=False)
        self.wv = nn.Linear(cfg.d_model, inner, bias=False)
        self.wo = nn.Linear(inner, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(inner, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(inner, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: DocumentMask,
                memory: LoRABlocks | KVBlocks | None = None) -> Tensor:
        B, T, _ = x.shape
        lora = memory if isinstance(memory, LoRABlocks) else None
        q = self.q_norm(adapted(self.wq, "wq", x, lora)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(adapted(self.wk, "wk", x, lora)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = adapted(self.wv, "wv", x, lora).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)
        if isinstance(memory, KVBlocks):  # the query without its position: memory keys carry none
            out = out + self.attend_memory(q, memory)
        return adapted(self.wo, "wo", out.transpose(1, 2).reshape(B, T, -1), lora)

    def attend_memory(self, q: Tensor, memory: KVBlocks) -> Tensor:
        """q [B, H, T, hd] over sequence b's M memory keys and values (all heads' [B, M, H * hd])."""
        B, M = memory.keys.shape[:2]
        keys, values = (t.to(q.dtype).view(B, M, self.n_heads, self.head_dim).transpose(1, 2)
                        for t in (memory.keys, memory.values))
        return F.scaled_dot_product_attention(q, keys, values)


class FeedForward(nn.Module):
    """SwiGLU; with memory, the per-sequence blocks join the hidden units (hmtrain_kernels.memory_ffn)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor, memory: Optional[tuple], impl: str) -> Tensor:
        if memory is None or isinstance(memory, (LoRABlocks, KVBlocks)):
            lora = memory if isinstance(memory, LoRABlocks) else None
            hidden = F.silu(adapted(self.w_gate, "w_gate", x, lora)) * adapted(self.w_up, "w_up", x, lora)
            return adapted(self.w_down, "w_down", hidden, lora)
        return ffn_with_units(x, (self.w_gate.weight, self.w_up.weight, self.w_down.weight), memory, impl)


def ffn_with_units(x: Tensor, weights: tuple[Tensor, Tensor, Tensor], units: tuple, impl: str) -> Tensor:
    """The SwiGLU FFN of `weights` (gate, up, down) with sequence b's units joining its hidden units. Under
    tensor parallelism both are one rank's slices and the result its partial sum (hmtrain/parallel)."""
    # one dtype for the kernel: under autocast x is bf16 while parameters stay fp32
    w_gate, w_up, w_down = (w.to(x.dtype) for w in weights)
    u_gate, u_up, u_down = (u.to(x.dtype) for u in units)
    return memory_ffn(x, w_gate, w_up, w_down, u_gate, u_up, u_down, impl=impl)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: DocumentMask,
                memory: Optional[tuple], impl: str) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, memory if isinstance(memory, (LoRABlocks, KVBlocks))
                          else None)
        return x + self.ffn(self.ffn_norm(x), memory, impl)


def memory_slots(memory_layers: Optional[Sequence[int]], n_layers: int) -> dict[int, int]:
    """Decoder layer -> its slot in a bank row, for the layers that carry memory (None: all of them)."""
    layers = range(n_layers) if memory_layers is None else memory_layers
    if any(not 0 <= i < n_layers for i in layers) or list(layers) != sorted(set(layers)) or not layers:
        raise ValueError(f"memory.layers {list(layers)}: expected ascending, unique layer indices in "
                         f"0..{n_layers - 1}")
    return {layer: slot for slot, layer in enumerate(layers)}


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int = 2048, memory_layers: Optional[Sequence[int]] = None):
        super().__init__()
        self.cfg = cfg
        self.memory_slots = memory_slots(memory_layers, cfg.n_layers)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_len = max_seq_len
        cos, sin = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, std) everywhere; residual-branch outputs scaled down by depth (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            is_residual_out = name.endswith(("attn.wo.weight", "ffn.w_down.weight"))
            nn.init.normal_(param, mean=0.0, std=out_std if is_residual_out else std)

    @property
    def output_weight(self) -> Tensor:
        """The head's [vocab, d_model] weight: the embedding table when tied."""
        return self.output.weight

    def hidden_states(self, tokens: Tensor, *, segments: Optional[Tensor] = None,
                      memory: Optional[LayerMemory] = None) -> Tensor:
        """tokens [B, T] -> final-norm output [B, T, d_model], the head's input (for a chunked loss).
        `segments` [B, T] marks documents (attention and RoPE stay inside each); `memory` supplies
        each sequence's fetched blocks, one slot per memory layer. With `model.document_mask=false` segments are
        ignored: attention is causal over the whole row and positions run from its start."""
        B, T = tokens.shape
        if not self.cfg.document_mask:  # one causal stream per row (both attention paths), positions from 0
            segments = None
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's max_seq_len {self.max_seq_len}")
        if segments is None:
            cos, sin = self.rope_cos[None, None, :T], self.rope_sin[None, None, :T]
        else:
            pos = positions_in_document(segments)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        attention = resolve_attention(self.cfg.attention, tokens.device, self.cfg.head_dim)
        mask = build_mask(segments, attention)  # once per forward, shared by every layer
        impl = resolve_impl(self.cfg.ffn_impl, tokens.device) if memory is not None else "torch"
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            slot = self.memory_slots.get(i) if memory is not None else None
            x = layer(x, cos, sin, mask, memory.layer(slot) if slot is not None else None, impl)
        return self.norm(x)

    @property
    def memory_layers(self) -> tuple[int, ...]:
        """The decoder layers that read memory, ascending (slot j of a bank row is the j-th)."""
        return tuple(self.memory_slots)

    def forward(self, tokens: Tensor, *, segments: Optional[Tensor] = None, memory: Optional[LayerMemory] = None,
                labels: Optional[Tensor] = None):
        """tokens [B, T] -> logits [B, T, vocab] (eval, generation); with `labels` [B, T], the training
        path: (sum of token losses, tokens counted) from `lm_loss_sum`, which never holds the full logits.
        The loss is computed here, inside forward, so that an FSDP-wrapped model has its head unsharded."""
        hidden = self.hidden_states(tokens, segments=segments, memory=memory)
        if labels is not None:
            return lm_loss_sum(hidden, self.output_weight, labels)
        return self.output(hidden)


def lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross entropy in fp32; labels of -100 (padding) are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)
