"""The anchor's engine under DeepSpeed ZeRO (stage 1, 2 or 3), behind the `Engine` interface (engine.py).

DeepSpeed owns the anchor's gradient reduction, partitioned optimizer state and update; the bank and
its sparse optimizer live beside it. These keep it equal to one process on the same batch:
- DeepSpeed averages gradients over ranks while hmtrain normalises the loss by the global token count
  and wants their sum: `loss_multiplier` (the data-parallel size) tells the trainer to multiply the loss
  by it, and to divide the bank's gradients, which do not pass through DeepSpeed, by it again; the loss is
  not divided by the accumulation steps either (`scale_wrt_gas=False`: the normalisation did that);
- one global norm clips anchor and bank together: before the boundary step DeepSpeed's own anchor norm
  is read, and its clip threshold set so that its clip equals max_norm / global norm;
- the trainer, not DeepSpeed's micro-step count, says which micro-batch ends a step: under owner placement
  the busiest rank of a step sets how many micro-batches every rank runs, which can exceed
  `gradient_accumulation_steps` (DeepSpeed would step in the middle, and not at the end);
- a client torch AdamW (no JIT-built fused op) with decoupled weight decay on matrices only;
- under bf16, gradients accumulate over micro-batches in fp32 (`data_types.grad_accum_dtype`; DeepSpeed's
  default is the model's dtype, and a bf16 sum of 16-32 micro-batches loses their small terms). ZeRO-1
  then runs DeepSpeed's BF16_Optimizer (fp32 gradient buffers), ZeRO-2/3 keep fp32 gradient partitions.
Checkpoints: weights go through DCP like every engine (full tensors gathered from ZeRO-3), the
partitioned optimizer state through DeepSpeed's own files, which resume on the same number of ranks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hmtrain.config import OptimConfig
from hmtrain.parallel.torch_engine import build_adamw

log = logging.getLogger(__name__)


def _skip_shm_build() -> None:
    # DeepSpeed's CPU accelerator JIT-builds a shared-memory collective op (~50 s) that gloo training
    # never uses; marking it incompatible makes DeepSpeed fall back to torch.distributed.
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def deepspeed_config(*, zero_stage: int, micro_batch: int, accumulation: int, bf16: bool) -> dict[str, Any]:
    """The config hmtrain hands deepspeed.initialize (see the module doc for each choice)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": 1.0,  # reset every step to realise the global clip (see module doc)
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, optim: OptimConfig, device: torch.device, *, zero_stage: int,
                 micro_batch: int, accumulation: int, world_size: int, bf16: bool):
        import deepspeed

        if device.type == "cpu":
            _skip_shm_build()
        self.device, self.world_size = device, world_size
        self.config = deepspeed_config(zero_stage=zero_stage, micro_batch=micro_batch, accumulation=accumulation,
                                       bf16=bf16)
        self._deepspeed = deepspeed
        self._module = model
        self.engine = self._initialize(optim)
        self._micro = 0
        self._trainable = True

    def _initialize(self, optim: OptimConfig):
        engine, _, _, _ = self._deepspeed.initialize(model=self._module, optimizer=build_adamw(self._module, optim,
                                                                                               self.device),
                                                     config=self.config)
        return engine

    @property
    def model(self):
        # a frozen anchor under ZeRO-1/2 runs as the module itself: the engine's forward arms DeepSpeed's
        # gradient reduction for the backward, which (ZeRO-2) fails on a step without any anchor gradient.
        # ZeRO-3 needs the engine's forward, which gathers the partitioned weights and releases them after.
        if self._trainable or self.config["zero_optimization"]["stage"] == 3:
            return self.engine
        return self._module

    def reset(self, optim: OptimConfig, accumulation: int = 1) -> None:
        """A new phase: a new engine over the same module, with fresh moments and the phase's settings."""
        self.config["gradient_accumulation_steps"] = accumulation
        self.engine.destroy()
        self.engine = self._initialize(optim)
        self._micro = 0

    def set_trainable(self, trainable: bool) -> None:
        self._module.requires_grad_(trainable)
        self._trainable = trainable

    @property
    def loss_multiplier(self) -> int:
        return self.world_size

    def backward(self, loss: Tensor, last: bool) -> None:
        if not self._trainable:  # no anchor gradient to reduce: plain autograd, to the bank's rows
            loss.backward()
            return
        # the step's last micro-batch is the boundary, not DeepSpeed's count of gradient_accumulation_steps:
        # under owner placement a step can hold more micro-batches than that (hmtrain/data/loading/loader.py)
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary

    def grad_sq_norm(self) -> Tensor:
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "scaled_global_norm"):  # ZeRO 1/2
            norm = optimizer.scaled_global_norm()
        elif hasattr(optimizer, "get_grads_for_norm"):  # ZeRO 1 under bf16: BF16_Optimizer, whole fp32 grads
            from deepspeed.runtime.utils import get_global_norm_of_tensors
            norm = get_global_norm_of_tensors(optimizer.get_grads_for_norm()[0], mpu=optimizer.mpu)
        else:  # ZeRO 3
            from deepspeed.runtime.utils import combine_grad_norm_groups
            norm = combine_grad_norm_groups(optimizer._get_norm_groups())
        return torch.as_tensor(norm, dtype=torch.float32, device=self.device) ** 2

    def step(self, lr: float, total_norm: Tensor, max_norm: float) -> None:
        optimizer = self.engine.optimizer
        if max_norm > 0:
            anchor_norm = float(self.grad_sq_norm().sqrt())
            total = float(total_norm)
            optimizer.clip_grad = max_norm * anchor_norm / total if total > 0 else max_norm
        else:
            optimizer.clip_grad = 0.0
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()

    def zero_grad(self) -> None:
        self._module.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        if self.config["zero_optimization"]["stage"] == 3:
            from deepspeed.runtime.zero import GatheredParameters
            with GatheredParameters(list(self._module.parameters()), modifier_rank=None):
                return {"model": {k: v.detach().clone() for k, v in self._module.state_dict().items()}}
        return {"model": self._module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.config["zero_optimization"]["stage"] == 3:
            from deepspeed.runtime.zero import GatheredParameters
            with GatheredParameters(list(self._module.parameters()), modifier_rank=0):
                self._module.load_state_dict(state["model"])
        else:
            self._module.load_state_dict(state["model"])
            # ZeRO 1/2 keep fp32 master partitions: refresh them from the loaded weights
            refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
            if refresh is not None:
                refresh()

    def save_extra(self, directory: Path) -> None:
        """DeepSpeed's partitioned optimizer state, in its own format, under <checkpoint>/deepspeed/."""
        self.engine.save_checkpoint(str(directory), tag="deepspeed", client_state={"world_size": self.world_size},
                                    save_latest=False, exclude_frozen_parameters=False)

    def load_extra(self, directory: Path) -> None:
        saved = Path(directory) / "deepspeed"
        if not saved.is_dir():
            raise ValueError(f"checkpoint {directory}: no deepspeed/ optimizer state (was it written with "
                             "parallel.engine=fsdp?)")
        ranks = len(list(saved.glob("*optim_states.pt")))
        if ranks and ranks != self.world_size:
            raise ValueError(f"checkpoint {directory}: DeepSpeed's optimizer state is partitioned for {ranks} "
                             f"ranks, this job has {self.world_size}; resume DeepSpeed runs on the same number "
                             "of ranks (or use parallel.engine=fsdp, whose checkpoints reshard)")
        self.engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=False,
                                    load_module_only=False)
