"""tests/cli_fork.py: a forked CLI call gives what a fresh `python -m hmtrain.cli` gives."""
import os
import subprocess
import sys

import pytest

from tests.cli_fork import ForkedCLI
from tests.e2e.conftest import REPO


@pytest.fixture(scope="module")
def forked():
    cli = ForkedCLI()
    yield cli
    cli.close()


@pytest.mark.parametrize("args, code", [(["info", "--config", "tiny"], 0),
                                        (["info", "--config", "tiny", "train.mode=sparse"], 2),
                                        (["no-such-command"], 2)])
def test_a_forked_call_equals_a_fresh_process(forked, tmp_path, args, code):
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    fresh = subprocess.run([sys.executable, "-m", "hmtrain.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    fork = forked.run("hmtrain.cli", args, cwd=tmp_path, env=env, timeout=300, server_env=env)
    assert (fork.returncode, fork.stdout, fork.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fork.returncode == code and (fork.stdout if code == 0 else fork.stderr)


def test_the_call_gets_its_own_environment(forked, tmp_path):
    base = {**os.environ, "PYTHONPATH": str(REPO)}
    fork = forked.run("hmtrain.cli", ["info", "--config", "tiny", "bogus.key=1"], cwd=tmp_path,
                      env={**base, "HMTRAIN_LOG_LEVEL": "not-a-level"}, timeout=300, server_env=base)
    assert fork.returncode == 2 and "HMTRAIN_LOG_LEVEL" in fork.stderr, fork.stderr
    assert os.environ.get("HMTRAIN_LOG_LEVEL") != "not-a-level"  # nothing reached this process
