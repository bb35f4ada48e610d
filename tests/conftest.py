"""Test-wide settings: one torch thread per process, and under pytest-xdist a multi-process test runs alone.

The suite runs on 2 shared cores, often beside CLI subprocesses; torch's OpenMP threads
spin-wait when cores are oversubscribed, which slows small ops by orders of magnitude.
README's test command runs it on one xdist worker per core (`-n auto`); tests/cores.py keeps a
`multiprocess` test (torchrun, SLURM) from sharing the cores with another worker's test.
"""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tests.cores import lock_dir, machine  # noqa: E402

torch.set_num_threads(1)
LOCKS = lock_dir()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup, call and teardown under the machine lock (outside pytest-timeout's clock: waiting is not running)."""
    with machine(LOCKS, exclusive=item.get_closest_marker("multiprocess") is not None):
        yield
