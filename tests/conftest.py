"""Test-wide settings: one torch thread per process.

The suite runs on 2 shared cores, often beside CLI subprocesses; torch's OpenMP threads
spin-wait when cores are oversubscribed, which slows small ops by orders of magnitude.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
