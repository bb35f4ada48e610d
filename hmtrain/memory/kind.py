"""What a memory unit is: the vectors it adds to every layer, and how the model reads them.

The bank (hmtrain/memory/bank.py) stores and moves rows without knowing what they mean; a
`MemoryKind` says it. A unit stores `slots` vectors of `width` values in every transformer layer,
so a table row of m units over n layers has shape [n_layers, len(slots), m, width] and
`params_per_unit = len(slots) * width` (DESIGN.md, "The memory, exactly"). A kind also says how one
layer's gathered blocks, one [B, M, width] tensor per slot, become the tensors the model's forward
takes, and how a fresh row starts. docs/memory-kinds.md says what a new kind implements.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hmtrain.config import Config
from hmtrain.config.hf import hf_shape


class MemoryKind(ABC):
    slots: ClassVar[tuple[str, ...]]  # what a unit stores in every layer, in row order

    @property
    @abstractmethod
    def width(self) -> int:
        """Values in each slot of a unit."""

    @property
    def params_per_unit(self) -> int:
        """Parameters one unit adds to one layer."""
        return len(self.slots) * self.width

    def row_shape(self, n_layers: int, units: int) -> tuple[int, int, int, int]:
        """One table row: `units` units in each of `n_layers` layers, slot-major within a layer."""
        return (n_layers, len(self.slots), units, self.width)

    @abstractmethod
    def layer_tensors(self, blocks: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """One layer's blocks, [B, M, width] per slot, as the model's forward takes them."""

    @abstractmethod
    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        """Fill a zeroed row in place as a fresh memory, which changes nothing at step 0."""


@dataclass(frozen=True)
class SwiGLUUnits(MemoryKind):
    """Extra gated hidden units: per unit and layer a gate row, an up row and a down column. hmtrain's
    anchor reads them with SiLU (SwiGLU); a Hugging Face anchor with its own MLP's activation (Gemma 3:
    tanh-GELU), the same rows either way.

    The down column is stored as a row (slot 2 holds W_down's columns transposed) so the three
    slots share a shape; `layer_tensors` hands the model u_down as [B, d, M] again (a view).
    """

    d_model: int
    slots: ClassVar[tuple[str, ...]] = ("gate", "up", "down")

    def __post_init__(self) -> None:
        if isinstance(self.d_model, bool) or not isinstance(self.d_model, int) or self.d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {self.d_model!r}")

    @property
    def width(self) -> int:
        return self.d_model

    def layer_tensors(self, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """u_gate [B, M, d], u_up [B, M, d], u_down [B, d, M]: what hmtrain_kernels.memory_ffn takes."""
        gate, up, down_t = blocks
        return gate, up, down_t.transpose(1, 2)

    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        """gate/up ~ N(0, init_std) like the anchor's; down stays zero, so the memory adds nothing.

        Drawn in fp32 on the CPU: a row gets the same values on every device and in every dtype."""
        n_layers, _, units, width = row.shape
        draw = torch.empty((n_layers, 2, units, width), dtype=torch.float32)  # slots 0 and 1: gate, up
        row[:, 0:2] = draw.normal_(0.0, init_std, generator=generator).to(device=row.device, dtype=row.dtype)


@dataclass(frozen=True)
class UngatedUnits(MemoryKind):
    """Extra hidden units of an ungated MLP (GPT-2's c_fc/c_proj): per unit and layer an up row and a down
    column, read as act(x U_up^T) U_down. The down column is stored as a row, as `SwiGLUUnits` does."""

    d_model: int
    slots: ClassVar[tuple[str, ...]] = ("up", "down")

    def __post_init__(self) -> None:
        if isinstance(self.d_model, bool) or not isinstance(self.d_model, int) or self.d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {self.d_model!r}")

    @property
    def width(self) -> int:
        return self.d_model

    def layer_tensors(self, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """u_up [B, M, d], u_down [B, d, M] (a view)."""
        up, down_t = blocks
        return up, down_t.transpose(1, 2)

    def init_row(self, row: Tensor, init_std: float, generator: torch.Generator) -> None:
        """up ~ N(0, init_std); down stays zero, so the memory adds nothing (drawn in fp32 on the CPU)."""
        n_layers, _, units, width = row.shape
        draw = torch.empty((n_layers, 1, units, width), dtype=torch.float32)
        row[:, 0:1] = draw.normal_(0.0, init_std, generator=generator).to(device=row.device, dtype=row.dtype)


def memory_kind(cfg: Config) -> MemoryKind:
    """The kind of memory a config trains (`memory.kind`): for a Hugging Face anchor, the units its MLP
    has (gated: three slots a unit; GPT-2: two)."""
    if cfg.memory.kind == "ffn":
        if cfg.model.family == "hf":
            if not hf_shape(cfg.model.hf_path).gated:
                return UngatedUnits(d_model=cfg.model.d_model)
        return SwiGLUUnits(d_model=cfg.model.d_model)
    raise ValueError(f"memory.kind: only 'ffn' memories are implemented, got {cfg.memory.kind!r}")
