"""Precision for a run: bf16 autocast on GPU, fp32 on CPU (the exact-resume path)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

from hmtrain.config import TrainConfig


@dataclass(frozen=True)
class Precision:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    def autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def resolve_precision(train: TrainConfig, device: torch.device) -> Precision:
    dtype = train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return Precision(device=device, autocast_dtype=torch.bfloat16 if dtype == "bf16" else None)
