"""Multi-process tests: torchrun with gloo on CPU, every job bounded by a timeout."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], *, cwd: Path, timeout: int = 240, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`timeout torchrun --standalone --nproc_per_node N <args>` with one thread per rank."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HMTRAIN_LOG_LEVEL": "WARNING",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    cmd = ["timeout", "--signal=KILL", str(timeout), sys.executable, "-m", "torch.distributed.run",
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--max_restarts", "0", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun x{nproc} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def prepare_four_subtrees(root: Path, people: int, documents: int, branching: str = "[4,2]") -> dict:
    """A synthetic corpus prepared with a [4, 2] tree (4 level-1 subtrees: owner placement in groups of one rank
    up to 4 ranks), or another `branching`."""
    from tests.e2e.conftest import MICRO, run_cli

    run_cli("data", "synth", "--out", str(root / "corpus"), "--people", str(people), "--documents", str(documents),
            cwd=root)
    overrides = [*MICRO, f"tree.branching={branching}", f"data.documents={root / 'corpus' / 'documents.jsonl.gz'}",
                 f"data.prepared={root / 'prepared'}"]
    run_cli("data", "prepare", "--config", "tiny", *overrides, cwd=root)
    return {"root": root, "overrides": overrides}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/dist" in str(item.fspath):
            item.add_marker(pytest.mark.multiprocess)
