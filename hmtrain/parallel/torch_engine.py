"""The anchor's engine for a plain or FSDP2-sharded module: AdamW, gradient norm, clipped step.

One of the two implementations of `Engine` (hmtrain/parallel/engine.py); DeepSpeed ZeRO is the other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from hmtrain.config import OptimConfig


def build_adamw(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed); fused on GPU, foreach on CPU."""
    params = list(model.parameters())
    # a ZeRO-3 partitioned parameter (a DeepSpeed engine rebuilt over the same module: a new phase, a
    # resume) holds an empty tensor; its own shape is `ds_shape`
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused, foreach=not fused,
    )


class TorchEngine:
    """AdamW over a plain or FSDP2 module; its gradients are DTensors when sharded."""

    def __init__(self, model: nn.Module, optim: OptimConfig, device: torch.device):
        self.model = model
        self.device = device
        self.optimizer = build_adamw(model, optim, device)

    def reset(self, optim: OptimConfig, accumulation: int = 1) -> None:
        """A new phase: fresh moments and the phase's hyper-parameters (`accumulation` is DeepSpeed's)."""
        self.optimizer = build_adamw(self.model, optim, self.device)

    def set_trainable(self, trainable: bool) -> None:
        self.model.requires_grad_(trainable)

    # gradients are summed over ranks as they are (FSDP's divide factor is 1): no loss rescaling
    loss_multiplier = 1

    def backward(self, loss: Tensor, last: bool) -> None:
        loss.backward()

    def _with_grads(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.grad is not None]

    def _by_mesh(self) -> list[list[nn.Parameter]]:
        """The parameters with gradients, grouped by their DTensor mesh: under tensor parallelism the split
        linears live on the 2-D (dp, tp) mesh and the replicated rest on `dp` alone, and torch's foreach
        norms and scales take one mesh at a time."""
        groups: dict[object, list[nn.Parameter]] = {}
        for p in self._with_grads():
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        return list(groups.values())

    def grad_sq_norm(self) -> Tensor:
        total = torch.zeros((), device=self.device)
        for params in self._by_mesh():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if isinstance(norm, DTensor):  # sharded gradients: reduce to the global norm
                norm = norm.full_tensor()
            total = total + norm.float() ** 2
        return total

    def step(self, lr: float, total_norm: Tensor, max_norm: float) -> None:
        """Clip by the global norm (anchor and bank together), then update; no host sync."""
        if max_norm > 0:  # scales each parameter's .grad by min(1, max_norm / total_norm)
            for params in self._by_mesh():
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save_extra(self, directory: Path) -> None:
        """Nothing beyond the DCP state (DeepSpeed's engine writes its optimizer partitions here)."""

    def load_extra(self, directory: Path) -> None:
        """Nothing beyond the DCP state."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
