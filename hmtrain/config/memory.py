"""`memory`: the hierarchical memory's FFN units per tree level (branching lives in `tree`), and which
decoder layers carry them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmtrain.config.checks import Choice, require

# memory.layers' named choices: all layers, or one third of them (np.array_split's cut: the first
# n_layers % 3 thirds get one layer more, so 35 layers split 12 / 12 / 11)
LAYER_THIRDS = ("early", "middle", "late")
LAYER_CHOICES = ("all", *LAYER_THIRDS)


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
    # which decoder layers carry memory (the paper's App. F): all, early, middle or late (a third of
    # model.n_layers, cut as np.array_split cuts: 35 layers are 0-11, 12-23, 24-34), or a list of layer
    # indices such as [4, 5]; the others run the plain FFN, and a bank row holds the memory layers' only
    layers: Any = "all"
    # the paper's control: a context-free memory of the fetched size
    generic: bool = True
    # standard deviation of the normal initialisation of the bank's rows
    init_std: float = 0.02
    # storage of the bank rows that are fetched and sent (the paper: bf16); a bf16 bank also keeps fp32
    # master rows, which the optimizer updates; optimizer moments and row gradients are always fp32
    dtype: BankDtype = BankDtype.fp32

    def validate(self, levels: int, n_layers: int) -> None:
        """`levels`: the tree's depth (tree.branching), one unit count each; `n_layers`: the anchor's."""
        require(len(self.units) == levels, "memory.units",
                f"needs one entry per tree level ({levels}), got {self.units}")
        require(all(u >= 0 for u in self.units), "memory.units", f"must be >= 0, got {self.units}")
        self.decoder_layers(n_layers)

    def decoder_layers(self, n_layers: int) -> tuple[int, ...]:
        """The decoder layers that carry memory, ascending, in a model of `n_layers`; the i-th of them reads
        layer slot i of every bank row. Raises ConfigError naming memory.layers."""
        layers = self.layers
        if isinstance(layers, str):
            require(layers in LAYER_CHOICES, "memory.layers",
                    f"must be all, early, middle, late or a list of layer indices, got {layers!r}")
            if layers == "all":
                return tuple(range(n_layers))
            third = np.array_split(np.arange(n_layers), 3)[LAYER_THIRDS.index(layers)]
            require(len(third) > 0, "memory.layers",
                    f"{layers}: a model of {n_layers} layer(s) has no {layers} third; list the layers instead")
            return tuple(int(i) for i in third)
        require(isinstance(layers, (list, tuple)), "memory.layers",
                f"must be all, early, middle, late or a list of layer indices, got {layers!r}")
        require(len(layers) > 0, "memory.layers", "the list of layer indices is empty")
        require(all(isinstance(i, int) and not isinstance(i, bool) for i in layers), "memory.layers",
                f"layer indices must be ints, got {list(layers)}")
        require(all(0 <= i < n_layers for i in layers), "memory.layers",
                f"layer indices must lie in 0..{n_layers - 1} (model.n_layers={n_layers}), got {list(layers)}")
        require(len(set(layers)) == len(layers), "memory.layers", f"layer indices repeat: {list(layers)}")
        require(list(layers) == sorted(layers), "memory.layers", f"layer indices must be ascending, got {list(layers)}")
        return tuple(layers)
