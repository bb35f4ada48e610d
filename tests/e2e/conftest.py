"""Shared small data for the end-to-end tests: a synthetic corpus prepared once per session."""
import atexit
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_fork import ForkedCLI

REPO = Path(__file__).resolve().parents[2]
FORKED = ForkedCLI()  # one server per pytest process (xdist worker), for every test directory that calls run_cli
atexit.register(FORKED.close)

# A model small enough that a CLI training step takes milliseconds on CPU.
MICRO = [
    "model.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_dim=16",
    "model.ffn_hidden=64", "memory.units=[8,4]", "tree.branching=[2,3]", "data.seq_len=64",
    "data.embedder=hashing", "data.tokenizer=byte", "data.shard_samples=16", "data.heldout_fraction=0.1",
    "train.global_batch_size=4", "train.micro_batch_size=4", "train.progress=false", "train.log_every=1",
    "eval.batch_size=8", "eval.max_probes=40",
]


def run_cli(*args: str, cwd: Path, check: bool = True, timeout: int = 300, env: dict | None = None,
            module: str = "hmtrain.cli") -> subprocess.CompletedProcess:
    """`python -m module args` (the CLI, or a test's wrapper of it); `env` adds to or overrides the environment.
    The CLI itself runs as a fork of a process that has imported it (tests/cli_fork.py): a process of its own
    without the interpreter's start-up; a wrapper module, which patches before it imports, runs afresh."""
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "HMTRAIN_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
            # the repository on the path: a test's wrapper module (tests.e2e.full_disk) must import from any cwd
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env = {**base, **(env or {})}
    if module == "hmtrain.cli" and FORKED.enabled():
        proc = FORKED.run(module, list(args), cwd=cwd, env=env, timeout=timeout, server_env=base)
    else:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"hmtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    run_cli("data", "synth", "--out", str(root / "corpus"), "--people", "40", "--documents", "200", cwd=root)
    data = [f"data.documents={root / 'corpus' / 'documents.jsonl.gz'}", f"data.prepared={root / 'prepared'}",
            f"data.probes={root / 'corpus' / 'probes.jsonl'}"]
    run_cli("data", "prepare", "--config", "tiny", *MICRO, *data, cwd=root)
    return {"root": root, "overrides": [*MICRO, *data]}
