"""`python -m tests.e2e.full_disk STEP_DIR BYTES ARGS...`: the hmtrain CLI on a disk that fills up while the
checkpoint STEP_DIR (e.g. step_00000004) is written: past BYTES bytes into its files, every write(2) fails
with ENOSPC, as the kernel's does. Only that system call is faked; what torch.save and DCP make of the
failure is their own."""
import errno
import io
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint.filesystem import FileSystem

from hmtrain.cli import main


class FillingFile(io.FileIO):
    """A file on a disk with `left[0]` bytes free."""

    left = [0]

    def write(self, data) -> int:
        """What fits, then ENOSPC once nothing does."""
        if self.left[0] == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(memoryview(data).cast("B")[:self.left[0]])
        self.left[0] -= written
        return written


def fill_disk_while_writing(step_dir: str, free: int) -> None:
    FillingFile.left[0] = free
    original = FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        if "w" in mode and Path(path).parent.name == f".{step_dir}.tmp":
            with io.BufferedWriter(FillingFile(path, "wb")) as stream:
                yield stream
        else:
            with original(self, path, mode) as stream:
                yield stream

    FileSystem.create_stream = create_stream


if __name__ == "__main__":
    fill_disk_while_writing(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
