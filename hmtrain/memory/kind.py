"""What a memory unit is: the vectors it adds to every layer, and how the model reads them.

The bank (hmtrain/memory/bank.py) stores and moves rows without knowing what they mean; a
`MemoryKind` says it. A unit stores one vector per slot in every memory layer (the decoder layers
`memory.layers` names, all by default; a row's layer i is the i-th of them); slot s has
`slot_widths[s]` values, so `params_per_unit = sum(slot_widths)` (DESIGN.md, "The memory, exactly").
A row of m units lays each layer out slot-major, [slot 0: m x w_0 | slot 1: m x w_1 | ...]; consecutive
slots of one width form a group (`groups`), which the fetch gathers with one index. A kind whose slots
share one width (one group) shows its row as [n_layers, len(slots), m, width], the others as the flat
[n_layers, m * params_per_unit] of the same bytes (`row_shape`). A kind also says how one layer's
gathered blocks, one [B, M, w_s] tensor per slot, become what the model's forward reads (`FFNUnits`,
`LoRABlocks`, `KVBlocks`), and how a fresh row starts. docs/memory-kinds.md says what a new kind implements.

Kinds (paper Section 2.2, App. I; each changes nothing at step 0): `ffn` extra SwiGLU units; `lora_ffn`,
`lora_qk`, `lora_ov` low-rank adapters of the FFN's three linears, of q/k, of v/o, a unit being one rank;
`kv` learned key/value vectors every query attends to (no causal mask, no position).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from hmtrain.config import Config
from hmtrain.config.hf import hf_shape

LORA_ALPHA = 2.0  # the paper's LoRA scale (App. I): adapters add (alpha / r) * B A x, r the fetched rank


class FFNUnits(NamedTuple):
    """Extra SwiGLU units joining the anchor FFN's hidden units (hmtrain_kernels.memory_ffn's inputs)."""

    u_gate: Tensor  # [B, M, d]
    u_up: Tensor  # [B, M, d]
    u_down: Tensor  # [B, d, M]


class LoRABlocks(NamedTuple):
    """Per-sequence low-rank adapters: linear `name` computes W x + scale * B (A x)."""

    adapters: dict[str, tuple[Tensor, Tensor]]  # linear name -> (A [B, M, d_in], B^T [B, M, d_out])
    scale: float


class KVBlocks(NamedTuple):
    """Per-sequence memory keys and values every query attends to; the result joins the attention output."""

    keys: Tensor  # [B, M, n_heads * head_dim]
    values: Tensor  # [B, M, n_heads * head_dim]


class MemoryKind(ABC):
    name: ClassVar[str]  # the `memory.kind` it is
    slots: tuple[str, ...]  # what a unit stores in every layer, in row order

    @property
    def slot_widths(self) -> tuple[int, ...]:
        """Values in each slot of a unit; a kind whose slots share one width sets `width` instead."""
        return (self.width,) * len(self.slots)  # type: ignore[attr-defined]

    @property
    def params_per_unit(self) -> int:
        """Parameters one unit adds to one layer."""
        return sum(self.slot_widths)

    @property
    def groups(self) -> tuple[tuple[int, int, int], ...]:
        """(first slot, slots, width) of each run of consecutive slots of one width, in row order."""
        runs: list[list[int]] = []
        for s, w in enumerate(self.slot_widths):
            if runs and runs[-1][2] == w:
                runs[-1][1] += 1
            else:
                runs.append([s, 1, w])
        return tuple(tuple(r) for r in runs)

    def row_shape(self, n_layers: int, units: int) -> tuple[int, ...]:
        """One table row: `units` units in each of `n_layers` layers, slot-major within a layer."""
        if len(self.groups) == 1:
            return (n_layers, len(self.slots), units, self.slot_widths[0])
        return (n_layers, units * self.params_per_unit)

    def slot_views(self, rows: Tensor, units: int) -> tuple[Tensor, ...]:
        """Views [..., n_layers, units, w_s] of every slot of `rows` [..., *row_shape(n_layers, units)]
        (a copy instead where the row's layers are not contiguous)."""
        dims = len(self.row_shape(1, units))
        flat = rows.reshape(*rows.shape[:rows.dim() - dims + 1], units * self.params_per_unit)
        views, start = [], 0
        for w in self.slot_widths:
            views.append(flat[..., start:start + units * w].unflatten(-1, (units, w)))
            start += units * w
        return tuple(views)

    @abstractmethod
    def layer_tensors(self, blocks: Sequence[Tensor]) -> FFNUnits | LoRABlocks | KVBlocks:
        """One layer's blocks, [B, M, w_s] per slot, as the model's forward reads them."""

    @abstractmethod
    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        """Fill a zeroed row in place as a fresh memory, which changes nothing at step 0.
        Draw in fp32 on the CPU from `generator`: a row starts the same on every device, rank and dtype."""

    def spec(self) -> dict:
        """What rebuilds this kind (an export's manifest): `kind_from_spec(kind.spec()) == kind`."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore


def _positive(kind: MemoryKind, *fields: str) -> None:
    for f in fields:
        value = getattr(kind, f)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{f} must be a positive int, got {value!r}")


def _fill(view: Tensor, draw: Tensor) -> None:
    view.copy_(draw.to(device=view.device, dtype=view.dtype))


@dataclass(frozen=True)
class SwiGLUUnits(MemoryKind):
    """Extra gated hidden units: per unit and layer a gate row, an up row and a down column. hmtrain's
    anchor reads them with SiLU (SwiGLU); a Hugging Face anchor with its own MLP's activation (Gemma 3:
    tanh-GELU), the same rows either way.

    The down column is stored as a row (slot 2 holds W_down's columns transposed) so the three
    slots share a shape; `layer_tensors` hands the model u_down as [B, d, M] again (a view).
    """

    d_model: int
    name: ClassVar[str] = "ffn"
    slots: ClassVar[tuple[str, ...]] = ("gate", "up", "down")

    def __post_init__(self) -> None:
        _positive(self, "d_model")

    @property
    def width(self) -> int:
        return self.d_model

    def layer_tensors(self, blocks: Sequence[Tensor]) -> FFNUnits:
        """u_gate [B, M, d], u_up [B, M, d], u_down [B, d, M]: what hmtrain_kernels.memory_ffn takes."""
        gate, up, down_t = blocks
        return FFNUnits(gate, up, down_t.transpose(1, 2))

    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        """gate/up ~ N(0, init_std) like the anchor's; down stays zero, so the memory adds nothing."""
        n_layers, _, units, width = row.shape
        draw = torch.empty((n_layers, 2, units, width), dtype=torch.float32)  # slots 0 and 1: gate, up
        _fill(row[:, 0:2], draw.normal_(0.0, init_std, generator=generator))


@dataclass(frozen=True)
class LoRA(MemoryKind):
    """Low-rank adapters of some of the anchor's linears; a unit is one rank of every adapter.

    Per unit and layer, linear t (d_in -> d_out) gets an A row [d_in] and a B column [d_out] (stored as a
    row); a sequence's fetched units stack into A [M, d_in], B^T [M, d_out]: the path's blocks
    concatenate along the rank. Slots are ordered by width (all A/B of width d first) so the row has at
    most two groups. Fresh: A Kaiming-uniform (torch's nn.Linear default, PEFT's LoRA A), B zero.
    """

    name: str
    targets: tuple[tuple[str, int, int], ...]  # (linear, d_in, d_out) in the model's names

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("a LoRA memory needs at least one target linear")
        for target, d_in, d_out in self.targets:
            if min(d_in, d_out) < 1:
                raise ValueError(f"LoRA target {target} needs positive widths, got {d_in} -> {d_out}")

    @property
    def _slots(self) -> list[tuple[str, int]]:
        slots = [(f"{t}.A", d_in) for t, d_in, _ in self.targets] + [(f"{t}.B", d_out) for t, _, d_out in self.targets]
        order = {w: i for i, (_, w) in reversed(list(enumerate(slots)))}  # first appearance of each width
        return sorted(slots, key=lambda s: order[s[1]])

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(name for name, _ in self._slots)

    @property
    def slot_widths(self) -> tuple[int, ...]:
        return tuple(w for _, w in self._slots)

    def layer_tensors(self, blocks: Sequence[Tensor]) -> LoRABlocks:
        by_name = dict(zip(self.slots, blocks))
        rank = blocks[0].shape[1]
        return LoRABlocks({t: (by_name[f"{t}.A"], by_name[f"{t}.B"]) for t, _, _ in self.targets},
                          LORA_ALPHA / max(rank, 1))

    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        """A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (Kaiming-uniform with a = sqrt(5)); B stays zero. `init_std`
        is the FFN kind's and unused: the adapter's scale is set by alpha and the rank."""
        n_layers = row.shape[0]
        units = row.numel() // (n_layers * self.params_per_unit)
        for name, width, view in zip(self.slots, self.slot_widths, self.slot_views(row, units)):
            if name.endswith(".A"):
                bound = 1.0 / math.sqrt(width)
                draw = torch.empty((n_layers, units, width), dtype=torch.float32)
                _fill(view, draw.uniform_(-bound, bound, generator=generator))


@dataclass(frozen=True)
class KeyValues(MemoryKind):
    """Learned keys and values per unit and layer, across all heads: every query attends to a sequence's
    M memory keys without causal mask or position (a softmax of their own), and the result is added to the
    attention's output before its output projection. Fresh: keys ~ N(0, init_std), values zero."""

    n_heads: int
    head_dim: int
    name: ClassVar[str] = "kv"
    slots: ClassVar[tuple[str, ...]] = ("key", "value")

    def __post_init__(self) -> None:
        _positive(self, "n_heads", "head_dim")

    @property
    def width(self) -> int:
        return self.n_heads * self.head_dim

    def layer_tensors(self, blocks: Sequence[Tensor]) -> KVBlocks:
        keys, values = blocks
        return KVBlocks(keys, values)

    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        n_layers, _, units, width = row.shape
        draw = torch.empty((n_layers, units, width), dtype=torch.float32)
        _fill(row[:, 0], draw.normal_(0.0, init_std, generator=generator))


@dataclass(frozen=True)
class UngatedUnits(MemoryKind):
    """Extra hidden units of an ungated MLP (GPT-2's c_fc/c_proj, `model.family=hf`): per unit and layer an
    up row and a down column, read as act(x U_up^T) U_down. The down column is stored as a row, as
    `SwiGLUUnits` does; `layer_tensors` hands u_down back as [B, d, M] (a view)."""

    d_model: int
    name: ClassVar[str] = "ffn_ungated"
    slots: ClassVar[tuple[str, ...]] = ("up", "down")

    def __post_init__(self) -> None:
        _positive(self, "d_model")

    @property
    def width(self) -> int:
        return self.d_model

    def layer_tensors(self, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """u_up [B, M, d], u_down [B, d, M]."""
        up, down_t = blocks
        return up, down_t.transpose(1, 2)

    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        """up ~ N(0, init_std); down stays zero, so the memory adds nothing."""
        n_layers, _, units, width = row.shape
        draw = torch.empty((n_layers, 1, units, width), dtype=torch.float32)
        _fill(row[:, 0:1], draw.normal_(0.0, init_std, generator=generator))


def kind_named(name: str, *, d_model: int, ffn_hidden: int, n_heads: int, head_dim: int) -> MemoryKind:
    """The kind `name` for an anchor of these widths."""
    inner = n_heads * head_dim
    lora = {"lora_ffn": (("w_gate", d_model, ffn_hidden), ("w_up", d_model, ffn_hidden),
                         ("w_down", ffn_hidden, d_model)),
            "lora_qk": (("wq", d_model, inner), ("wk", d_model, inner)),
            "lora_ov": (("wv", d_model, inner), ("wo", inner, d_model))}
    if name == "ffn":
        return SwiGLUUnits(d_model=d_model)
    if name in lora:
        return LoRA(name=name, targets=lora[name])
    if name == "kv":
        return KeyValues(n_heads=n_heads, head_dim=head_dim)
    raise ValueError(f"memory.kind must be one of ffn, lora_ffn, lora_qk, lora_ov or kv, got {name!r}")


def kind_from_spec(spec: dict) -> MemoryKind:
    """The kind an export's manifest names (`MemoryKind.spec`)."""
    spec = dict(spec)
    name = spec.pop("name")
    if name == "ffn":
        return SwiGLUUnits(**spec)
    if name == "ffn_ungated":
        return UngatedUnits(**spec)
    if name == "kv":
        return KeyValues(**spec)
    return LoRA(name=name, targets=tuple(tuple(t) for t in spec["targets"]))


def memory_kind(cfg: Config) -> MemoryKind:
    """The kind of memory a config trains (`memory.kind`). A Hugging Face anchor (`model.family=hf`) takes
    FFN units, those its MLP has: gated (three slots a unit) or, for GPT-2, ungated (two)."""
    m = cfg.model
    if m.family == "hf":
        if cfg.memory.kind != "ffn":
            raise ValueError(f"config key 'memory.kind': a Hugging Face anchor (model.family=hf) reads ffn "
                             f"memories, got {cfg.memory.kind!r}")
        return SwiGLUUnits(d_model=m.d_model) if hf_shape(m.hf_path).gated else UngatedUnits(d_model=m.d_model)
    return kind_named(str(cfg.memory.kind), d_model=m.d_model, ffn_hidden=m.ffn_hidden, n_heads=m.n_heads,
                      head_dim=m.head_dim)
