"""The anchor's engine: what the trainer asks of whatever updates the anchor's weights.

Two implementations: `TorchEngine` (hmtrain/parallel/torch_engine.py: a plain or FSDP2 module with
torch AdamW) and `DeepSpeedEngine` (hmtrain/parallel/deepspeed_engine.py: ZeRO 1-3). The bank and
its sparse optimizer live beside either. An engine is a checkpoint state (hmtrain/checkpoint): its
`state_dict` holds the weights under `model` (and the optimizer under `optim` where DCP stores it);
`save_extra` / `load_extra` write and read state kept in another library's own format.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from hmtrain.config import OptimConfig


class Engine(Protocol):
    model: nn.Module  # what the forward pass calls (the module, or the engine wrapping it)

    # the factor the loss is multiplied by before `backward` (an engine that averages gradients over
    # ranks undoes that averaging with it); the bank's gradients are divided by it again
    loss_multiplier: int

    def reset(self, optim: OptimConfig, accumulation: int = 1) -> None:
        """A new phase: fresh optimizer moments with the phase's hyper-parameters and accumulation steps."""

    def set_trainable(self, trainable: bool) -> None: ...

    def backward(self, loss: Tensor, last: bool) -> None:
        """Backward of one micro-batch; `last`: the step's final one."""

    def grad_sq_norm(self) -> Tensor:
        """The squared global gradient norm over every rank, as a device scalar."""

    def step(self, lr: float, total_norm: Tensor, max_norm: float) -> None:
        """Clip by `total_norm` (anchor and bank together) to `max_norm`, update, clear the gradients."""

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_extra(self, directory: Path) -> None: ...

    def load_extra(self, directory: Path) -> None: ...
