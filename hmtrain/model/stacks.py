"""Building blocks shared by the memory models and the retention probe: block stacks, RoPE, expansions.

A stack is a list of blocks of one kind, each called as `block(x, cos, sin)`:
  transformer  the anchor's pre-norm block (hmtrain/model/transformer.py), causal, RoPE from position 0
  mixer        the masked-mixer block (hmtrain/model/mixer.py); cos/sin are ignored
Stacks are plain lists so that a model can keep all its blocks in one `.layers` ModuleList (what
hmtrain/parallel/parallelize.py wraps) and run slices of it.

An expansion turns one vector per window into n_ctx decoder inputs (Badger 2026):
  repeat    the same vector at every position, through one Linear(d_in, d_out)
  unrolled  position i reads the circular window of d_in/2 features starting at feature i mod d_in,
            and one shared Linear(d_in/2, d_out) maps it to the decoder's width
`repeat` adds a learned position embedding: otherwise every position of a transformer decoder reads
the same input and, attention averaging identical values, emits the same output at every position
(a masked mixer tells positions apart by its weights; a transformer cannot). `unrolled` inputs
already differ by position and get none (an extra position path lets a decoder fit positional
statistics first and slows its learning to read the vector: measured on the e2e autoencoder).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from hmtrain.config import BlockType, Expansion, ModelConfig, StackConfig
from hmtrain.model.loss import lm_loss_sum
from hmtrain.model.mixer import MaskedMixerBlock
from hmtrain.model.transformer import Block, RMSNorm, rope_tables
from hmtrain.util.labels import IGNORE_INDEX

BLOCKS = BlockType.values()
EXPANSIONS = Expansion.values()
# parameters written into the residual stream: scaled down by depth at init (GPT-2), as in the anchor
RESIDUAL_OUT = ("attn.wo.weight", "ffn.w_down.weight")


class TransformerBlock(Block):
    """The anchor's block without documents or memory: plain causal attention over the row."""

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, cos, sin, None, None, "torch")


def block_model_config(stack: StackConfig, *, norm_eps: float, rope_base: float) -> ModelConfig:
    """The ModelConfig a transformer block of this stack is built from (no vocabulary involved)."""
    return ModelConfig(vocab_size=1, d_model=stack.d_model, n_layers=stack.n_layers, n_heads=stack.n_heads,
                       head_dim=stack.head_dim, ffn_hidden=stack.ffn_hidden, qk_norm=True, rope_base=rope_base,
                       norm_eps=norm_eps)


def build_blocks(kind: str, stack: StackConfig, length: int, *, norm_eps: float = 1e-5,
                 rope_base: float = 10_000.0) -> list[nn.Module]:
    """`stack.n_layers` blocks of `kind` for rows of at most `length` positions."""
    if kind == "transformer":
        cfg = block_model_config(stack, norm_eps=norm_eps, rope_base=rope_base)
        return [TransformerBlock(cfg) for _ in range(stack.n_layers)]
    if kind == "mixer":
        return [MaskedMixerBlock(stack.d_model, length, stack.ffn_hidden, norm_eps) for _ in range(stack.n_layers)]
    raise ValueError(f"unknown block type {kind!r}; expected one of {BLOCKS}")


class Rope(nn.Module):
    """RoPE tables for rows of up to `max_len` positions (not saved: recomputed from the config)."""

    def __init__(self, head_dim: int, max_len: int, base: float):
        super().__init__()
        cos, sin = rope_tables(head_dim, max_len, base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, length: int) -> tuple[Tensor, Tensor]:
        return self.cos[None, None, :length], self.sin[None, None, :length]


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, rope: Optional[Rope]) -> Tensor:
    cos, sin = rope.tables(x.shape[1]) if rope is not None else (None, None)
    for block in blocks:
        x = block(x, cos, sin)
    return x


def init_parameter(name: str, param: Tensor, *, std: float, n_layers: int,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """A fresh value for one parameter: norms' gains 1, mixing matrices as in MaskedMixerBlock, matrices
    N(0, std) with residual outputs scaled by 1/sqrt(2 n_layers). Returned on CPU, in fp32."""
    shape = tuple(param.shape)
    if param.dim() < 2:
        return torch.ones(shape)
    if name.endswith(".mix") or name == "mix":
        bound = 1.0 / math.sqrt(shape[0])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    scale = std / math.sqrt(2 * max(n_layers, 1)) if name.endswith(RESIDUAL_OUT) else std
    return torch.randn(shape, generator=generator) * scale


def init_module(module: nn.Module, *, std: float, n_layers: int, generator: Optional[torch.Generator] = None,
                skip_vectors: bool = True) -> None:
    """Initialise `module`'s parameters in place (vectors are left alone unless skip_vectors=False)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if skip_vectors and param.dim() < 2:
                continue
            assign_(param, init_parameter(name, param, std=std, n_layers=n_layers, generator=generator))


def assign_(param: Tensor, value: Tensor) -> None:
    """param <- value (a full tensor), also when param is an FSDP2-sharded DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    data = param.data if isinstance(param, nn.Parameter) else param
    if isinstance(data, DTensor):
        shard = distribute_tensor(value.to(data.device, data.dtype), data.device_mesh, data.placements)
        data.to_local().copy_(shard.to_local())
    else:
        data.copy_(value.to(data.device, data.dtype))


class Expansion(nn.Module):
    """[N, d_in] vectors -> [N, n_ctx, d_out] decoder inputs, repeated or unrolled."""

    def __init__(self, kind: str, d_in: int, d_out: int, n_ctx: int):
        super().__init__()
        if kind not in EXPANSIONS:
            raise ValueError(f"unknown expansion {kind!r}; expected one of {EXPANSIONS}")
        self.kind, self.n_ctx = kind, n_ctx
        if kind == "repeat":
            self.proj = nn.Linear(d_in, d_out, bias=False)
            self.position = nn.Parameter(torch.zeros(n_ctx, d_out))
            nn.init.normal_(self.position, std=0.02)
            return
        if d_in < 2 or d_in % 2:
            raise ValueError(f"the unrolled expansion needs an even vector width >= 2, got {d_in}")
        self.proj = nn.Linear(d_in // 2, d_out, bias=False)
        self.register_buffer("index", unroll_index(d_in, n_ctx), persistent=False)

    def forward(self, vectors: Tensor) -> Tensor:
        if self.kind == "repeat":
            return self.proj(vectors)[:, None, :] + self.position
        return self.proj(vectors[:, self.index])  # [N, n_ctx, d_in/2] -> [N, n_ctx, d_out]


def unroll_index(d: int, n_ctx: int) -> Tensor:
    """[n_ctx, d/2]: position i reads features (i + k) mod d for k = 0 .. d/2 - 1."""
    return (torch.arange(n_ctx)[:, None] + torch.arange(d // 2)[None, :]) % d


class ProbeDecoder(nn.Module):
    """The retention probe's decoder: expansion -> causal blocks -> norm -> head, trained to emit the
    window's own tokens at their positions (unshifted) from nothing but the expanded vector."""

    def __init__(self, *, d_in: int, vocab_size: int, n_ctx: int, expansion: str, block: str, stack: StackConfig,
                 norm_eps: float = 1e-5, rope_base: float = 10_000.0, init_std: float = 0.02):
        super().__init__()
        self.n_ctx = n_ctx
        self.expansion = Expansion(expansion, d_in, stack.d_model, n_ctx)
        self.layers = nn.ModuleList(build_blocks(block, stack, n_ctx, norm_eps=norm_eps, rope_base=rope_base))
        self.rope = Rope(stack.head_dim, n_ctx, rope_base) if block == "transformer" else None
        self.norm = RMSNorm(stack.d_model, norm_eps)
        self.head = nn.Linear(stack.d_model, vocab_size, bias=False)
        init_module(self, std=init_std, n_layers=stack.n_layers)

    def hidden(self, vectors: Tensor) -> Tensor:
        return self.norm(run_blocks(self.layers, self.expansion(vectors), self.rope))

    def forward(self, vectors: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(summed cross-entropy, tokens counted) of emitting `targets` [N, n_ctx] (-100: padding)."""
        return lm_loss_sum(self.hidden(vectors), self.head.weight, targets)

    @torch.no_grad()
    def score(self, vectors: Tensor, targets: Tensor) -> dict[str, float]:
        """Summed cross-entropy, tokens counted and tokens whose argmax is the target."""
        logits = self.head(self.hidden(vectors)).float()
        return score_logits(logits, targets)


def score_logits(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """{'loss_sum', 'count', 'correct'} of logits [..., V] against targets [...] (-100 ignored)."""
    keep = targets != IGNORE_INDEX
    flat, labels = logits.flatten(0, -2), targets.flatten()
    loss = torch.nn.functional.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((flat.argmax(-1) == labels) & keep.flatten()).sum()
    return {"loss_sum": float(loss), "count": int(keep.sum()), "correct": int(correct)}
