"""The manifest of a prepared directory: what it holds, and the size and checksum of every file.

Version 2 (keys beyond these are free-form metadata: tokenizer, tree, embedder, counts):
  seq_len, branching
  splits: {name: {
      sequences        N; sequence ids are 0..N-1, grouped by level-1 node
      tokens           real (non-padding) tokens over the split
      level1_offsets   k_1 + 1 ints: the ids of level-1 node j are [offsets[j], offsets[j+1])
      shards           [{file, index, samples}]: tars and their per-shard indexes (see shards.py)
      arrays           {paths, real, shard, offset}: .npy files, one row per sequence (see sequences.py)
  }}
  files: {relative path: {bytes, sha256}} for every file but manifest.json
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from hmtrain.config import check_branching
from hmtrain.util.files import sha256_file, write_json

MANIFEST_VERSION = 2
SPLITS = ("train", "heldout")  # every prepared directory has both (heldout may hold no sequences)
ARRAYS = ("paths", "real", "shard", "offset")


def node_counts(
    paths_and_counts: Iterable[tuple[tuple[int, ...], int]],
    branching: Sequence[int],
) -> list[list[int]]:
    """Sum counts per node at every level: out[i][j] = total over paths through node j of level i."""
    branching = list(check_branching(branching))
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


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_split(source: str, name: str, split, k1: int, files: dict) -> None:
    where = f"{source}: splits[{name!r}]"
    if not isinstance(split, dict):
        raise ValueError(f"{where} must be an object")
    for key in ("sequences", "tokens", "level1_offsets", "shards", "arrays"):
        if key not in split:
            raise ValueError(f"{where} lacks {key!r}")
    n = split["sequences"]
    if not _is_int(n) or not _is_int(split["tokens"]):
        raise ValueError(f"{where}: sequences and tokens must be ints >= 0")
    offsets = split["level1_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != k1 + 1 or not all(_is_int(o) for o in offsets)
            or offsets[0] != 0 or offsets[-1] != n or any(a > b for a, b in zip(offsets, offsets[1:]))):
        raise ValueError(f"{where}: level1_offsets must be {k1 + 1} non-decreasing ints from 0 to {n}")
    shards = split["shards"]
    if not isinstance(shards, list):
        raise ValueError(f"{where}: shards must be a list")
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("index"), str)
                and _is_int(s.get("samples"), 1)):
            raise ValueError(f"{where}: shards[{i}] must be {{'file': str, 'index': str, 'samples': int >= 1}}, "
                             f"got {s!r}")
    if sum(s["samples"] for s in shards) != n:
        raise ValueError(f"{where}: shards hold {sum(s['samples'] for s in shards)} samples, sequences is {n}")
    arrays = split["arrays"]
    if not isinstance(arrays, dict) or sorted(arrays) != sorted(ARRAYS):
        raise ValueError(f"{where}: arrays must name the files {list(ARRAYS)}")
    listed = [s[k] for s in shards for k in ("file", "index")] + [arrays[k] for k in ARRAYS]
    unlisted = [f for f in listed if f not in files]
    if unlisted:
        raise ValueError(f"{where}: {unlisted[0]} is not in the manifest's files")


def validate_manifest(manifest: dict, *, source: str = "manifest") -> None:
    """Check the fields every reader relies on; raise ValueError naming the problem."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        older = isinstance(version, int) and version < MANIFEST_VERSION
        raise ValueError(f"{source}: manifest version {version!r}, this hmtrain reads version {MANIFEST_VERSION}"
                         + ("; prepare the data again (`hmtrain data prepare --overwrite`)" if older else ""))
    for key in ("seq_len", "branching", "splits", "files"):
        if key not in manifest:
            raise ValueError(f"{source}: missing required key {key!r}")
    if not _is_int(manifest["seq_len"], 1):
        raise ValueError(f"{source}: seq_len must be an int >= 1, got {manifest['seq_len']!r}")
    branching = manifest["branching"]
    if not isinstance(branching, list):
        raise ValueError(f"{source}: branching must be a list of ints, got {branching!r}")
    check_branching(branching, name=f"{source}: branching")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(r, dict) and _is_int(r.get("bytes")) and isinstance(r.get("sha256"), str) for r in files.values()
    ):
        raise ValueError(f"{source}: files must map each file to {{'bytes': int, 'sha256': str}}")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise ValueError(f"{source}: splits must be an object of split name -> split")
    for name, split in splits.items():
        _check_split(source, name, split, branching[0], files)
    sizes = [math.prod(branching[: i + 1]) for i in range(len(branching))]
    for key in ("node_tokens", "node_documents"):
        if key not in manifest:
            continue
        levels = manifest[key]
        if not isinstance(levels, list) or [len(x) if isinstance(x, list) else None for x in levels] != sizes:
            raise ValueError(f"{source}: {key} must be one list per level with {sizes} entries")


def write_manifest(path: Path, manifest: dict) -> None:
    """Validate and write the manifest as JSON, atomically."""
    validate_manifest(manifest, source=str(path))
    write_json(path, manifest)


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


def verify_manifest_files(root: Path, files: dict[str, dict], *, checksums: bool = False) -> None:
    """Every file of the manifest's `files` exists with its recorded size (and checksum); ValueError naming the
    first that differs."""
    root = Path(root)
    again = "prepare it again (`hmtrain data prepare --overwrite`)"
    for rel, record in files.items():
        path = root / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing (listed in {root / 'manifest.json'}); {again}") from None
        if size != record["bytes"]:
            raise ValueError(f"{path} holds {size} bytes, the manifest says {record['bytes']}: truncated or "
                             f"replaced; {again}")
        if checksums and sha256_file(path) != record["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the manifest's: the file is corrupt; {again}")
