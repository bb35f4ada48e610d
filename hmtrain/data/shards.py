"""Webdataset tar shards of packed sequences, and the manifest that lists them.

Shards are grouped by level-1 node (the first entry of the path) so that
`owner` placement can hand whole subtrees to ranks without splitting a shard.
Every file is written under a temporary name and renamed when complete: a
crash can leave a `.tmp` behind, never a truncated shard under a final name.

Sample format (one tar member per field, webdataset naming):
  <key>.tokens.npy  int32 [seq_len + 1]
  <key>.path.npy    int64 [levels]
  <key>.docs.json   list of document ids
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset

from hmtrain.data.packing import PackedSequence

MANIFEST_VERSION = 1
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_FIELDS = ("tokens.npy", "path.npy", "docs.json")


def shard_name(split: str, subtree: int, index: int) -> str:
    return f"{split}-{subtree:05d}-{index:05d}.tar"


def _check_split(split: str) -> None:
    # '-' separates name fields and '.' separates the key from the field in a
    # tar member, so both would make names ambiguous.
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split name must match [A-Za-z0-9_]+, got {split!r}")


def _npy_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr, allow_pickle=False)
    return out.getvalue()


class _OpenShard:
    """One tar being written under `<name>.tmp`."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self.file: BinaryIO = open(self.tmp, "wb")
        # mtime fixed so identical data gives byte-identical shards.
        self.writer = webdataset.TarWriter(self.file, encoder=False, mtime=0)
        self.samples = 0

    def commit(self) -> None:
        self.writer.close()  # does not close a file object it did not open
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            # Closed first so the tar stream does not flush into a closed file later.
            self.writer.close()
        except OSError:
            pass  # the file is discarded anyway (e.g. the disk filled up)
        finally:
            self.file.close()
            self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Writes packed sequences into `{split}-{subtree:05d}-{index:05d}.tar` files.

    One shard is open per level-1 subtree; it is committed (renamed to its final
    name) when it reaches `max_samples` or on `close()`. Leaving the `with`
    block on an exception removes the unfinished `.tmp` files.
    """

    def __init__(self, out_dir: Path, split: str, *, max_samples: int = 1024):
        _check_split(split)
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.max_samples = max_samples
        self._open: dict[int, _OpenShard] = {}
        self._next_index: dict[int, int] = {}
        self._done: list[dict] = []
        self._counter = 0  # global sample counter: keys are unique across all shards of the writer
        self._shape: tuple[int, int] | None = None  # (tokens length, path depth) of the first sample
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, seq: PackedSequence) -> None:
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir}/{self.split} is closed")
        tokens = np.asarray(seq.tokens)
        if tokens.ndim != 1 or tokens.dtype != np.int32:
            raise ValueError(f"tokens must be a 1-D int32 array, got {tokens.dtype} {tokens.shape}")
        path = tuple(int(p) for p in seq.path)
        if not path or min(path) < 0:
            raise ValueError(f"path must be a non-empty tuple of node ids >= 0, got {path}")
        shape = (tokens.size, len(path))
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(
                f"sequence has {shape[0]} tokens and a {shape[1]}-level path, earlier ones "
                f"{self._shape[0]} and {self._shape[1]}: one split holds one seq_len and tree"
            )

        subtree = path[0]
        shard = self._open.get(subtree)
        if shard is None:
            index = self._next_index.get(subtree, 0)
            self._next_index[subtree] = index + 1
            shard = _OpenShard(self.out_dir / shard_name(self.split, subtree, index))
            self._open[subtree] = shard
        shard.writer.write(
            {
                "__key__": f"{self._counter:010d}",
                "tokens.npy": _npy_bytes(tokens),
                "path.npy": _npy_bytes(np.asarray(path, dtype=np.int64)),
                "docs.json": json.dumps([str(d) for d in seq.doc_ids]).encode("utf-8"),
            }
        )
        self._counter += 1
        shard.samples += 1
        if shard.samples >= self.max_samples:
            self._commit(subtree)

    def _commit(self, subtree: int) -> None:
        shard = self._open.pop(subtree)
        shard.commit()
        self._done.append({"file": shard.final.name, "samples": shard.samples, "subtree": subtree})

    def close(self) -> list[dict]:
        """Commit open shards; return every shard written, sorted by file name."""
        if not self._closed:
            for subtree in sorted(self._open):
                self._commit(subtree)
            self._closed = True
        return sorted(self._done, key=lambda e: e["file"])

    def abort(self) -> None:
        """Drop the unfinished shards; committed ones stay (they are complete)."""
        for shard in self._open.values():
            shard.abort()
        self._open.clear()
        self._closed = True


def read_shard(path: Path) -> list[dict[str, Any]]:
    """All samples of one shard, in file order: {"key", "tokens", "path", "docs"}.

    Raises FileNotFoundError if missing, ValueError naming the file if corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard not found: {path}")
    fields: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, field = member.name.partition(".")
                handle = tar.extractfile(member)
                assert handle is not None  # regular files always have data
                fields.setdefault(key, {})[field] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"corrupt shard {path}: {e}") from e

    samples = []
    for key, parts in fields.items():  # dicts keep insertion order = file order
        missing = [f for f in _FIELDS if f not in parts]
        if missing:
            raise ValueError(f"corrupt shard {path}: sample {key!r} lacks {missing}")
        try:
            tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
            node_path = np.load(io.BytesIO(parts["path.npy"]), allow_pickle=False)
            docs = json.loads(parts["docs.json"].decode("utf-8"))
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt shard {path}: sample {key!r}: {e}") from e
        if tokens.ndim != 1 or node_path.ndim != 1:
            raise ValueError(f"corrupt shard {path}: sample {key!r} has non 1-D tokens or path")
        samples.append({"key": key, "tokens": tokens, "path": node_path, "docs": docs})
    return samples


def list_shards(out_dir: Path, split: str) -> list[dict]:
    """Complete shards of `split` found in `out_dir` (`.tmp` leftovers are ignored).

    Rebuilds the manifest's shard entries from disk, e.g. after a crashed
    prepare step; sample counts come from the tar headers.
    """
    _check_split(split)
    pattern = re.compile(rf"^{split}-(\d{{5,}})-(\d{{5,}})\.tar$")
    entries = []
    for p in sorted(Path(out_dir).iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_file():
            continue
        try:
            with tarfile.open(p, "r:") as tar:
                keys = {member.name.partition(".")[0] for member in tar if member.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"corrupt shard {p}: {e}") from e
        entries.append({"file": p.name, "samples": len(keys), "subtree": int(m.group(1))})
    return entries


def node_counts(
    paths_and_counts: Iterable[tuple[tuple[int, ...], int]],
    branching: Sequence[int],
) -> list[list[int]]:
    """Sum counts per node at every level: out[i][j] = total over paths through node j of level i."""
    branching = [int(b) for b in branching]
    if not branching or min(branching) < 1:
        raise ValueError(f"branching must be a non-empty list of factors >= 1, got {branching}")
    sizes = [math.prod(branching[: i + 1]) for i in range(len(branching))]
    counts = [[0] * n for n in sizes]
    for path, count in paths_and_counts:
        path = tuple(int(p) for p in path)
        if len(path) != len(branching):
            raise ValueError(f"path {path} has {len(path)} levels, the tree has {len(branching)}")
        for i, node in enumerate(path):
            if not 0 <= node < sizes[i]:
                raise ValueError(f"path {path}: node {node} at level {i} is outside [0, {sizes[i]})")
            if i > 0 and node // branching[i] != path[i - 1]:
                raise ValueError(
                    f"path {path}: node {node} at level {i} has parent {node // branching[i]}, "
                    f"not {path[i - 1]}"
                )
            counts[i][node] += int(count)
    return counts


def validate_manifest(manifest: dict, *, source: str = "manifest") -> None:
    """Check the fields every reader relies on; raise ValueError naming the problem."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        raise ValueError(f"{source}: unknown manifest version {version!r}, expected {MANIFEST_VERSION}")
    for key in ("seq_len", "branching", "splits"):
        if key not in manifest:
            raise ValueError(f"{source}: missing required key {key!r}")
    seq_len = manifest["seq_len"]
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"{source}: seq_len must be an int >= 1, got {seq_len!r}")
    branching = manifest["branching"]
    if not isinstance(branching, list) or not branching or not all(
        isinstance(b, int) and b >= 1 for b in branching
    ):
        raise ValueError(f"{source}: branching must be a non-empty list of ints >= 1, got {branching!r}")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise ValueError(f"{source}: splits must be an object of split name -> shard list")
    for split, entries in splits.items():
        if not isinstance(entries, list):
            raise ValueError(f"{source}: splits[{split!r}] must be a list of shard entries")
        for i, entry in enumerate(entries):
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("file"), str)
                and isinstance(entry.get("samples"), int)
                and entry["samples"] >= 0
                and isinstance(entry.get("subtree"), int)
            )
            if not ok:
                raise ValueError(
                    f"{source}: splits[{split!r}][{i}] must be {{'file': str, 'samples': int, "
                    f"'subtree': int}}, got {entry!r}"
                )
    sizes = [math.prod(branching[: i + 1]) for i in range(len(branching))]
    for key in ("node_tokens", "node_documents"):
        if key not in manifest:
            continue
        levels = manifest[key]
        if not isinstance(levels, list) or [len(x) if isinstance(x, list) else None for x in levels] != sizes:
            raise ValueError(f"{source}: {key} must be one list per level with {sizes} entries")


def write_manifest(path: Path, manifest: dict) -> None:
    """Validate and write the manifest as JSON, atomically."""
    path = Path(path)
    validate_manifest(manifest, source=str(path))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict:
    """Read and validate a manifest written by `write_manifest`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt manifest {path}: {e}") from e
    validate_manifest(manifest, source=str(path))
    return manifest
