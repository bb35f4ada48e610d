"""Webdataset tar shards of packed sequences, each with an index for random access.

A shard `<prefix>-NNNNN.tar` comes with `<prefix>-NNNNN.idx.npy`, one int64 row per
sample: the byte offset of its raw tokens inside the tar (the data of the
`tokens.npy` member, after the npy header), its real-token count and its path.
Readers `pread` a sequence's tokens directly (`read_tokens`); the tar stays a plain webdataset
shard that other tools can stream. Shards are written independently of each
other, so several processes can write shards of one split side by side (each
with its own prefix); `hmtrain.data.format.sequences.write_split_index` merges their
indexes afterwards.

Every file is written under a temporary name and renamed when complete, the
index before the tar: a final-named tar always has its index. A crash leaves
`.tmp` files behind, never a truncated shard under a final name.

Sample format (one tar member per field, webdataset naming):
  <key>.tokens.npy  int32 [seq_len + 1]
  <key>.path.npy    int64 [levels]
  <key>.docs.json   list of document ids
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import webdataset

from hmtrain.util.files import atomic_write


@dataclass
class PackedSequence:
    tokens: np.ndarray  # int32 [seq_len + 1]: inputs are tokens[:-1], targets tokens[1:]
    path: tuple[int, ...]  # the leaf's full path (one node per level)
    doc_ids: list[str]  # documents (or parts of documents) inside, in order
    num_real: int  # tokens that are not padding


FIELDS = ("tokens.npy", "path.npy", "docs.json")
# Columns of a shard index row; the path fills the columns from INDEX_PATH on.
INDEX_OFFSET, INDEX_REAL, INDEX_PATH = 0, 1, 2
TOKEN_DTYPE = np.dtype("<i4")  # a tokens member's raw data, which readers pread at INDEX_OFFSET
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def shard_names(prefix: str, index: int) -> tuple[str, str]:
    """(tar, index) file names of shard `index` of `prefix`, e.g. shards/train-00003.tar."""
    return f"{prefix}-{index:05d}.tar", f"{prefix}-{index:05d}.idx.npy"


def _npy_bytes(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr, allow_pickle=False)
    return out.getvalue()


def _tokens_offset(f: BinaryIO, offset: int, length: int, where: str) -> int:
    """Check the npy header of a tokens member and return where its raw data starts."""
    f.seek(offset)
    try:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise ValueError(f"{where}: tokens are not an npy array: {e}") from e
    if dtype != TOKEN_DTYPE or fortran or shape != (length,):
        raise ValueError(f"{where}: tokens are {dtype} {shape}, expected int32 ({length},)")
    return f.tell()


def index_shard(path: Path, reals: list[int], paths: list[tuple[int, ...]], length: int) -> np.ndarray:
    """The index of a finished tar whose samples were written with these real counts and paths."""
    with tarfile.open(path, "r:") as tar:
        members = [m for m in tar if m.isfile() and m.name.endswith(".tokens.npy")]
    if len(members) != len(reals):
        raise ValueError(f"{path}: holds {len(members)} token arrays, {len(reals)} samples were written")
    index = np.empty((len(reals), INDEX_PATH + len(paths[0])), dtype=np.int64)
    with open(path, "rb") as f:
        for row, member in enumerate(members):
            index[row, INDEX_OFFSET] = _tokens_offset(f, member.offset_data, length, f"{path}: {member.name}")
    index[:, INDEX_REAL] = reals
    index[:, INDEX_PATH:] = np.asarray(paths, dtype=np.int64)
    return index


class _OpenShard:
    """One tar being written under `<name>.tmp`."""

    def __init__(self, tar: Path, index: Path):
        self.tar, self.index = tar, index
        self.tmp = tar.with_name(tar.name + ".tmp")
        self.file: BinaryIO = open(self.tmp, "wb")
        # mtime fixed so identical data gives byte-identical shards.
        self.writer = webdataset.TarWriter(self.file, encoder=False, mtime=0)
        self.reals: list[int] = []
        self.paths: list[tuple[int, ...]] = []

    def commit(self, length: int) -> None:
        self.writer.close()  # does not close a file object it did not open
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        index = index_shard(self.tmp, self.reals, self.paths, length)
        with atomic_write(self.index) as f:
            np.save(f, index, allow_pickle=False)
        os.replace(self.tmp, self.tar)

    def abort(self) -> None:
        try:
            # Closed first so the tar stream does not flush into a closed file later.
            self.writer.close()
        except OSError:
            pass  # the file is discarded anyway (e.g. the disk filled up)
        finally:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.index.with_name(self.index.name + ".tmp").unlink(missing_ok=True)


class ShardWriter:
    """Writes packed sequences, in order, into shards of at most `max_samples` under `root`.

    `prefix` is the shards' path relative to `root` without the number, e.g. "shards/train".
    `close()` returns one entry per shard: {"file", "index", "samples"}, paths relative to `root`.
    Leaving the `with` block on an exception removes the unfinished `.tmp` files.
    """

    def __init__(self, root: Path, prefix: str, *, max_samples: int = 1024):
        parts = Path(prefix).parts
        if not parts or not all(_PREFIX_RE.match(p) for p in parts):
            raise ValueError(f"shard prefix must be a relative path of [A-Za-z0-9_-] names, got {prefix!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.root = Path(root)
        (self.root / prefix).parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self._open: _OpenShard | None = None
        self._done: list[dict] = []
        self._counter = 0  # sample counter: keys are unique across the writer's shards
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
            raise RuntimeError(f"ShardWriter for {self.root / self.prefix} is closed")
        tokens = np.asarray(seq.tokens)
        if tokens.ndim != 1 or tokens.dtype != np.int32:
            raise ValueError(f"tokens must be a 1-D int32 array, got {tokens.dtype} {tokens.shape}")
        path = tuple(int(p) for p in seq.path)
        if not path or min(path) < 0:
            raise ValueError(f"path must be a non-empty tuple of node ids >= 0, got {path}")
        if not 0 < seq.num_real <= tokens.size:
            raise ValueError(f"num_real must be in [1, {tokens.size}], got {seq.num_real}")
        shape = (tokens.size, len(path))
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(
                f"sequence has {shape[0]} tokens and a {shape[1]}-level path, earlier ones "
                f"{self._shape[0]} and {self._shape[1]}: one split holds one seq_len and tree"
            )
        if self._open is None:
            tar, index = shard_names(self.prefix, len(self._done))
            self._open = _OpenShard(self.root / tar, self.root / index)
        shard = self._open
        shard.writer.write({
            "__key__": f"{self._counter:010d}",
            "tokens.npy": _npy_bytes(tokens.astype(TOKEN_DTYPE, copy=False)),
            "path.npy": _npy_bytes(np.asarray(path, dtype=np.int64)),
            "docs.json": json.dumps([str(d) for d in seq.doc_ids]).encode("utf-8"),
        })
        shard.reals.append(int(seq.num_real))
        shard.paths.append(path)
        self._counter += 1
        if len(shard.reals) >= self.max_samples:
            self._commit()

    def _commit(self) -> None:
        shard, self._open = self._open, None
        assert shard is not None and self._shape is not None
        shard.commit(self._shape[0])
        self._done.append({"file": shard.tar.relative_to(self.root).as_posix(),
                           "index": shard.index.relative_to(self.root).as_posix(), "samples": len(shard.reals)})

    def close(self) -> list[dict]:
        """Commit the open shard; return every shard written, in order."""
        if not self._closed:
            if self._open is not None:
                self._commit()
            self._closed = True
        return list(self._done)

    def abort(self) -> None:
        """Drop the open shard's `.tmp` files; committed shards stay."""
        if self._open is not None:
            self._open.abort()
            self._open = None
        self._closed = True


def read_tokens(fd: int, offset: int, length: int, where: str) -> np.ndarray:
    """The `length` tokens of one sample, read with one pread from its open shard at the byte `offset`
    its index row holds (INDEX_OFFSET); ValueError starting with `where` if the shard ends first."""
    size = TOKEN_DTYPE.itemsize * length
    raw = os.pread(fd, size, offset)
    if len(raw) != size:
        raise ValueError(f"{where} ends after {len(raw)} of {size} bytes at offset {offset}: the shard is truncated; "
                         "prepare the data again (`hmtrain data prepare --overwrite`)")
    return np.frombuffer(raw, dtype=TOKEN_DTYPE)


def load_shard_index(root: Path, entry: dict, levels: int) -> np.ndarray:
    """A shard's index, checked against its manifest entry."""
    path = Path(root) / entry["index"]
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"corrupt shard index {path}: {e}") from e
    if index.dtype != np.int64 or index.shape != (entry["samples"], INDEX_PATH + levels):
        raise ValueError(f"corrupt shard index {path}: {index.dtype} {index.shape}, expected int64 "
                         f"({entry['samples']}, {INDEX_PATH + levels})")
    return index


def read_shard(path: Path) -> list[dict]:
    """Every sample of a tar, in file order: {"key", "tokens", "path", "docs"} (for tools and tests)."""
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
        missing = [f for f in FIELDS if f not in parts]
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
