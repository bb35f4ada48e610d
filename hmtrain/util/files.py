"""Crash-safe outputs: check an output path before any work, write files and swap directories atomically,
record the size and checksum of every file a directory holds.

The directory swap keeps one promise: at every instant the final name holds a complete directory,
the old one or the new one. On Linux that is one `renameat2(RENAME_EXCHANGE)` call; elsewhere it
is two renames (old aside, new in), and `recover_dir` finishes the job when a process died between them.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_output_dir(path: Path, what: str) -> None:
    """Raise ValueError naming `what` when `path` cannot become a writable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a directory")
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{what} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{what} {path}: {parent} is not writable")
            return


def aside_names(final: Path) -> tuple[Path, Path]:
    """(`<final>.tmp`, `<final>.old`): where a new directory is built and where the old one goes."""
    return final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def replace_dir(new: Path, final: Path, *, exchange: bool = True) -> None:
    """Move the complete directory `new` to `final`, replacing what is there, then delete the old one."""
    new, final = Path(new), Path(final)
    _, old = aside_names(final)
    if old.exists():
        shutil.rmtree(old)
    if not final.exists():
        os.replace(new, final)
    elif exchange and _exchange(new, final):
        os.replace(new, old)  # `new` now holds the old directory
    else:
        os.replace(final, old)
        os.replace(new, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(final: Path) -> None:
    """Clean up after a process killed while building or swapping `final` (see `replace_dir`).

    `<final>.old` is complete only while `final` is missing (killed between the two renames): put it
    back. Otherwise it is an old directory being deleted, and `<final>.tmp` an unfinished build.
    """
    final = Path(final)
    tmp, old = aside_names(final)
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    for leftover in (tmp, old):
        if leftover.is_dir():
            shutil.rmtree(leftover)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """An empty `<final>.tmp` to build in; removed again if the block raises (or is interrupted)."""
    tmp, _ = aside_names(Path(final))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """`<path>.tmp` to write in full, renamed to `path` when the block completes (removed if it raises):
    readers never see half a file. For writers that need a path (a memory map); the caller syncs it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """`path` opened for writing under `<path>.tmp`, synced and renamed when the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    """Atomically (see `atomic_write`): a reader sees the old file or the whole new one."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def write_text(path: Path, text: str) -> None:
    """Atomically (see `atomic_write`), as utf-8."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_files(root: Path, *, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} for every regular file under `root`."""
    root = Path(root)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            out[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out
