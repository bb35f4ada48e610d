"""Kernel tests run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be in the environment before the kernels are decorated (module import), so
it is set here, at collection time, before any test imports ``hmtrain_kernels.memory_ffn_triton``.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
