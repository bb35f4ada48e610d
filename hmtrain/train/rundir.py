"""The run directory: created with a clear error, and locked while a `train` uses it.

Two `train` processes on one run directory would overwrite each other's checkpoints and
open two MLflow runs (a scheduler that requeues a job while the old process still lives
does exactly that). The first takes an exclusive `flock` on `<run_dir>/train.lock`; the
second stops at once, naming the holder. The kernel releases the lock when its process
dies, however it dies (SIGKILL included), so a stale lock file never blocks `--resume`.
In a multi-rank job only rank 0 takes it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = "train.lock"

log = logging.getLogger(__name__)


class RunDirLocked(RuntimeError):
    """Another live process trains in this run directory."""

    input_error = True  # exit 2 (hmtrain/exits.py): the run directory given is in use


def make_run_dir(run_dir: Path, key: str = "train.run_dir") -> Path:
    """Create `run_dir` (and parents); a path running through a regular file is named as such."""
    run_dir = Path(run_dir)
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise FileExistsError(f"{key} {run_dir}: {parent} is a file, not a directory")
        if parent.exists():
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileExistsError(f"{key} {run_dir}: cannot create it ({exc.strerror})") from exc
    return run_dir


class RunLock:
    """Holds the run directory's lock until `release` (or the process's death)."""

    def __init__(self, run_dir: Path, held: bool = True, created: bool = False):
        self.path = Path(run_dir) / LOCK_FILE
        self.created = created  # this process made the directory
        self._fd: Optional[int] = None
        if not held:  # ranks other than 0
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise RunDirLocked(f"train.run_dir {Path(run_dir)} is in use by another `hmtrain train` ({holder}); "
                               "wait for it to end or stop it, or choose another train.run_dir") from None
        except OSError as exc:  # a filesystem without flock (some NFS mounts): run, but say so
            os.close(fd)
            log.warning("cannot lock %s (%s): running without the run-directory lock, so make sure no other "
                        "`hmtrain train` uses %s", self.path, exc.strerror, run_dir)
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd: Optional[int] = fd

    def release(self) -> None:
        if self._fd is not None:
            if [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
                # the run stopped before writing anything (a refused --resume, a bad input): leave the
                # directory as it was found (unlinked while still held, so no other trainer holds it)
                self.path.unlink()
                if self.created:
                    self.path.parent.rmdir()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown: it is still writing its lock file"


def lock_run_dir(run_dir: Path, rank: int = 0) -> RunLock:
    """Create and lock the run directory on rank 0 (other ranks get a lock that holds nothing);
    raises RunDirLocked naming the holder's pid and host if a live process holds it.
    Use as `with lock_run_dir(run_dir, rank): ...` or call `.release()`."""
    if rank != 0:
        return RunLock(run_dir, held=False)
    existed = Path(run_dir).is_dir()
    return RunLock(make_run_dir(run_dir), created=not existed)
