"""Exit codes mean one thing each: 2 bad input, 1 internal error, 128+N a signal (hmtrain/exits.py)."""
import errno
from pathlib import Path

import pytest
import torch
import torch.distributed

from hmtrain.config import ConfigError
from hmtrain.exits import exit_code, one_line
from hmtrain.train.signals import Interrupted


class Declared(RuntimeError):
    """An exception that says itself which kind it is, as a broken checkpoint or a peer's failure does."""

    def __init__(self, input_error: bool):
        super().__init__("declared")
        self.input_error = input_error


@pytest.mark.parametrize("exc, code", [
    (ConfigError("config key 'train.mode': must be hierarchical or dense, got 'x'"), 2),
    (ValueError("--world-size must be >= 1, got 0"), 2),
    (FileNotFoundError("no document files match 'x'"), 2),
    (FileExistsError("data/prepared exists; pass --overwrite"), 2),
    (IsADirectoryError("--out x: is a directory"), 2),
    (PermissionError("--out x: not writable"), 2),
    (ImportError("the 'minilm' embedder needs the package ..."), 2),
    (Declared(input_error=True), 2),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1),
    (torch.distributed.DistBackendError("NCCL error: remote process exited or there was a network error"), 1),
    (torch.distributed.DistError("a peer rank is gone"), 1),
    (RuntimeError("something hmtrain did not expect"), 1),
    (OSError(errno.ENOSPC, "No space left on device"), 1),
    (KeyError("step"), 1),
    (Declared(input_error=False), 1),
    (Interrupted(15, 4, Path("runs/x/checkpoints/step_00000004")), 128 + 15),
])
def test_each_exception_maps_to_its_one_code(exc, code):
    assert exit_code(exc) == code


def test_an_internal_error_names_its_type_on_one_line_and_points_at_debug():
    line = one_line(torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB"))
    assert line == ("internal error: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
                    "(rerun with --debug for the traceback)")
    assert one_line(ValueError("config key 'x':\n bad")) == "config key 'x': bad"
