"""`memory`: the hierarchical memory's FFN units per tree level (branching lives in `tree`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from hmtrain.config.checks import Choice, require


class MemoryKind(Choice):
    ffn = "ffn"
    lora_ffn = "lora_ffn"
    lora_qk = "lora_qk"
    lora_ov = "lora_ov"
    kv = "kv"


class BankDtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class MemoryConfig:
    # what a memory unit is (docs/memory-kinds.md): extra SwiGLU units (ffn, the paper's choice), one rank of LoRA
    # adapters on the FFN's linears (lora_ffn), on q/k (lora_qk) or v/o (lora_ov), or a learned key/value pair (kv)
    kind: MemoryKind = MemoryKind.ffn
    # FFN units per layer fetched from each tree level, from level 1 down (one entry per level; 0: none)
    units: list[int] = field(default_factory=lambda: [256, 64, 16, 0])
    # the paper's control: a context-free memory of the fetched size
    generic: bool = True
    # standard deviation of the normal initialisation of the bank's rows
    init_std: float = 0.02
    # storage of the bank rows that are fetched and sent (the paper: bf16); a bf16 bank also keeps fp32
    # master rows, which the optimizer updates; optimizer moments and row gradients are always fp32
    dtype: BankDtype = BankDtype.fp32

    def validate(self, levels: int) -> None:
        """`levels`: the tree's depth (tree.branching), one unit count each."""
        require(len(self.units) == levels, "memory.units",
                f"needs one entry per tree level ({levels}), got {self.units}")
        require(all(u >= 0 for u in self.units), "memory.units", f"must be >= 0, got {self.units}")
