"""Crash-safe outputs: the directory swap killed at every step, staging, output checks, file records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmtrain.data.format.manifest import verify_manifest_files
from hmtrain.util.files import (
    atomic_path,
    atomic_write,
    check_output_dir,
    record_files,
    recover_dir,
    staging_dir,
    write_text,
)

# Runs replace_dir(new, final) and SIGKILLs itself at the n-th file-system step (before or after each
# rename, exchange and delete), the way a scheduler's kill would land.
_KILLER = """
import os, shutil, signal, sys
from pathlib import Path
import hmtrain.util.files as files

kill_at, exchange = int(sys.argv[3]), sys.argv[4] == "1"
count = 0

def step():
    global count
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def wrap(fn):
    def wrapped(*args, **kwargs):
        step()
        out = fn(*args, **kwargs)
        step()
        return out
    return wrapped

files.os.replace = wrap(os.replace)
files._exchange = wrap(files._exchange)
files.shutil.rmtree = wrap(shutil.rmtree)
files.replace_dir(Path(sys.argv[1]), Path(sys.argv[2]), exchange=exchange)
"""


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make(root: Path, tag: str) -> dict[str, bytes]:
    (root / "shards").mkdir(parents=True)
    (root / "manifest.json").write_text(f"manifest {tag}")
    (root / "tree.pt").write_text(f"tree {tag}")
    for i in range(3):
        (root / "shards" / f"s{i}.tar").write_text(f"shard {i} {tag}" * 100)
    return _tree(root)


@pytest.mark.parametrize("exchange", [True, False])
def test_killed_swap_leaves_old_or_new_complete(tmp_path: Path, exchange: bool) -> None:
    """Killed at each step of the swap, `final` holds the old or the new directory, whole.

    With renameat2 that holds at every instant. With two renames `final` is missing between them,
    and `recover_dir` (which `prepare` runs first) puts the old one back.
    """
    outcomes = []
    for kill_at in range(1, 20):
        case = tmp_path / str(kill_at)
        final, new = case / "prepared", case / "prepared.tmp"
        old_tree, new_tree = _make(final, "old"), _make(new, "new")
        proc = subprocess.run([sys.executable, "-c", _KILLER, str(new), str(final), str(kill_at), str(int(exchange))],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            assert _tree(final) == new_tree
            assert sorted(p.name for p in case.iterdir()) == ["prepared"]
            break
        assert proc.returncode == -9, proc.stderr
        if final.exists():
            assert _tree(final) in (old_tree, new_tree), kill_at
        else:
            assert not exchange, f"killed at step {kill_at}, {final} is missing"
        before = _tree(final) if final.exists() else None
        recover_dir(final)
        assert _tree(final) in (old_tree, new_tree)
        assert before is None or _tree(final) == before  # recovery never swaps a complete directory
        assert sorted(p.name for p in case.iterdir()) == ["prepared"]  # no .tmp or .old left
        outcomes.append("new" if _tree(final) == new_tree else "old")
    else:
        pytest.fail("the swap never completed")
    assert "old" in outcomes and "new" in outcomes  # kills landed on both sides of the swap


def test_staging_dir_is_removed_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "prepared"
    (tmp_path / "prepared.tmp").mkdir()
    (tmp_path / "prepared.tmp" / "stale").write_text("from a killed run")
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(final) as tmp:
            assert list(tmp.iterdir()) == []  # a stale build is cleared first
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"--out {blocker}/a/b: {blocker} is a file, not a directory"):
        check_output_dir(blocker / "a" / "b", "--out")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output_dir(blocker, "--out")
    check_output_dir(tmp_path / "new" / "dir", "--out")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["probes.jsonl"]
    with atomic_write(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new"
    write_text(path, "newer")
    assert path.read_text() == "newer" and sorted(os.listdir(tmp_path)) == ["probes.jsonl"]


def test_atomic_path_renames_when_done_and_removes_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "train.real.npy"
    with atomic_path(path) as tmp:  # a writer that needs a path, such as a memory map
        tmp.write_bytes(b"new")
        assert not path.exists()
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["train.real.npy"]


def test_record_and_verify_files(tmp_path: Path) -> None:
    _make(tmp_path, "x")
    files = record_files(tmp_path)
    assert "manifest.json" not in files and files["tree.pt"]["bytes"] == len("tree x")
    verify_manifest_files(tmp_path, files, checksums=True)

    shard = tmp_path / "shards" / "s1.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + b"!")  # same size, one byte changed
    verify_manifest_files(tmp_path, files)  # sizes alone cannot see it
    with pytest.raises(ValueError, match=f"{shard}: sha256 differs"):
        verify_manifest_files(tmp_path, files, checksums=True)
    shard.write_bytes(data[:100])
    with pytest.raises(ValueError, match=f"{shard} holds 100 bytes, the manifest says {len(data)}"):
        verify_manifest_files(tmp_path, files)
    shard.write_bytes(data)
    (tmp_path / "tree.pt").unlink()
    with pytest.raises(FileNotFoundError, match="tree.pt is missing"):
        verify_manifest_files(tmp_path, files)
