"""Exit codes through the real CLI: 2 for a bad config key, 1 for a genuine internal failure (the
host cannot allocate the bank), with one stderr line each; --debug adds the traceback, not another code."""
from tests.e2e.conftest import run_cli

# 10^12 units per level-0 node: petabytes, beyond any host's address space, so allocating the bank fails
UNALLOCATABLE = "memory.units=[1000000000000,4]"


def test_a_bad_config_key_exits_2_with_one_line(tmp_path):
    proc = run_cli("info", "--config", "tiny", "train.mode=sparse", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["hmtrain info: error: config key 'train.mode': must be hierarchical or dense, "
                                        "got 'sparse'"]


def test_running_out_of_memory_exits_1_with_one_line_and_debug_shows_the_traceback(prepared, tmp_path):
    argv = ["train", "--config", "tiny", *prepared["overrides"], UNALLOCATABLE, f"train.run_dir={tmp_path / 'run'}",
            "logging.mlflow=false"]
    proc = run_cli(*argv, cwd=tmp_path, check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("hmtrain train: error: internal error: RuntimeError: ") and "allocate" in lines[0]
    assert lines[0].endswith("(rerun with --debug for the traceback)")
    debug = run_cli("--debug", *argv, cwd=tmp_path, check=False)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert debug.stderr.splitlines()[-1] == lines[0]
