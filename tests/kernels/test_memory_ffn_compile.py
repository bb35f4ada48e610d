"""The kernels compile for an H100 (sm_90) without one: the interpreter alone skips type checks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS = ("gate_up_fwd", "down_fwd", "act_bwd", "x_bwd", "down_wgrad", "gate_up_wgrad")


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_tensor_cores(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(REPO), "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-m", "hmtrain_kernels.compile_check", "--arch", "90", "--dtype", "bf16"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for name in KERNELS:
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line is not None, out.stdout
        assert "wgmma" in line, line  # bf16 on Hopper must reach the tensor cores
