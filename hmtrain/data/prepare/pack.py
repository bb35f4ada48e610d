"""Stage 3 of `prepare`: routed files -> packed sequences -> shards, one pack unit at a time.

A training sequence never mixes paths (DESIGN.md): `pack_leaf` is called once per leaf, so every
sequence it yields carries exactly one path; its documents are separated by EOT (what the labels
make of that at train time: loading/batch.py). Each sequence holds seq_len + 1 tokens, so no token
is stored twice and the stream is recoverable exactly.

A pack unit is a range of leaves of one split. Units are cut from the token count per leaf alone
(about UNIT_SHARDS full shards each, never splitting a leaf), never from the number of processes,
and a unit's shards are named after it (`shards/{split}-{unit:05d}-{n:05d}.tar`). So the prepared
directory is the same, file for file, whichever process packs which unit, and a killed pack redoes
only the units without their `packed/` record.

Within a unit, each leaf's documents are packed in corpus order (input file, then record), as one
process reading the whole corpus would: the leaf's run in every routed file, file by file.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby
from pathlib import Path

import numpy as np

from hmtrain.data.format.manifest import SPLITS
from hmtrain.data.format.shards import PackedSequence, ShardWriter
from hmtrain.data.prepare.route import RoutedFile
from hmtrain.data.prepare.work import Work
from hmtrain.util.files import sha256_file, write_json

UNIT_SHARDS = 16
# Units per split at most: a packer looks into every routed file once per unit.
MAX_UNITS = 4096
_OPEN_FILES = 64
_INT32_MAX = np.iinfo(np.int32).max


def _check_ids(*, seq_len: int, eot_id: int, pad_id: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    for name, value in (("eot_id", eot_id), ("pad_id", pad_id)):
        if not 0 <= value <= _INT32_MAX:
            raise ValueError(f"{name} must be in [0, 2**31), got {value}")
    if eot_id == pad_id:
        # Padding must be distinguishable from the EOT that ends the last
        # document, otherwise that EOT's label would be masked (or padding trained).
        raise ValueError(f"eot_id and pad_id must differ, both are {eot_id}")


def _doc_array(doc_id: str, tokens: Sequence[int]) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"document {doc_id!r}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"document {doc_id!r}: tokens must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > _INT32_MAX:
        raise ValueError(
            f"document {doc_id!r}: token ids must be in [0, 2**31), "
            f"got range [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int32, copy=False)


def pack_leaf(
    docs: Iterable[tuple[str, Sequence[int]]],
    *,
    path: tuple[int, ...],
    seq_len: int,
    eot_id: int,
    pad_id: int,
) -> Iterator[PackedSequence]:
    """Greedily pack one leaf's documents (each followed by EOT) into sequences.

    A document longer than the room left continues in the next sequence (its id
    appears in both). Only the final sequence is padded. Empty documents are
    skipped: a lone EOT would spend a position and teach nothing.
    """
    _check_ids(seq_len=seq_len, eot_id=eot_id, pad_id=pad_id)
    path = tuple(int(p) for p in path)
    if not path or min(path) < 0:
        raise ValueError(f"path must be a non-empty tuple of node ids >= 0, got {path}")
    window = seq_len + 1
    buf = np.empty(window, dtype=np.int32)
    fill = 0
    doc_ids: list[str] = []
    last_doc = -1  # index (not id) of the document last written to buf: ids may repeat

    for doc_index, (doc_id, doc_tokens) in enumerate(docs):
        arr = _doc_array(doc_id, doc_tokens)
        if arr.size == 0:
            continue
        pos = 0
        total = arr.size + 1  # the document plus its EOT
        while pos < total:
            take = min(window - fill, total - pos)
            body = min(take, arr.size - pos)  # part of `take` that is document tokens
            if body > 0:
                buf[fill : fill + body] = arr[pos : pos + body]
            if body < take:  # the EOT fits in this chunk (it is always its last token)
                buf[fill + body] = eot_id
            if last_doc != doc_index:
                doc_ids.append(str(doc_id))
                last_doc = doc_index
            fill += take
            pos += take
            if fill == window:
                yield PackedSequence(buf.copy(), path, doc_ids, window)
                fill, doc_ids, last_doc = 0, [], -1

    if fill > 0:
        buf[fill:] = pad_id
        yield PackedSequence(buf.copy(), path, doc_ids, fill)


def leaf_totals(work: Work, num_files: int, num_leaves: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens incl. EOT, documents) per (split, leaf): int64 [2, num_leaves] each."""
    tokens = np.zeros((len(SPLITS), num_leaves), dtype=np.int64)
    docs = np.zeros_like(tokens)
    for f in range(num_files):
        root = work.routed(f)
        groups = np.load(root / "groups.npy", allow_pickle=False)
        offsets = np.load(root / "doc_offsets.npy", mmap_mode="r", allow_pickle=False)
        counts = groups[:, 4] - groups[:, 3]
        np.add.at(tokens, (groups[:, 0], groups[:, 1]), offsets[groups[:, 4]] - offsets[groups[:, 3]] + counts)
        np.add.at(docs, (groups[:, 0], groups[:, 1]), counts)
    return tokens, docs


def plan_units(tokens: np.ndarray, *, seq_len: int, shard_samples: int) -> list[dict]:
    """Leaf ranges of about UNIT_SHARDS shards' tokens (fewer units for a very large corpus)."""
    units = []
    for code, split in enumerate(SPLITS):
        target = max(UNIT_SHARDS * shard_samples * (seq_len + 1), math.ceil(int(tokens[code].sum()) / MAX_UNITS))
        count, start, total = 0, None, 0
        for leaf in np.flatnonzero(tokens[code]).tolist():
            start = leaf if start is None else start
            total += int(tokens[code, leaf])
            if total >= target:
                units.append({"split": split, "unit": count, "leaf_start": start, "leaf_stop": leaf + 1,
                              "tokens": total})
                count, start, total = count + 1, None, 0
        if start is not None:
            units.append({"split": split, "unit": count, "leaf_start": start, "leaf_stop": leaf + 1, "tokens": total})
    return units


def leaf_path(leaf: int, branching: Sequence[int]) -> tuple[int, ...]:
    """A leaf's full path: its ancestor at level i is leaf // (k_{i+1} * ... * k_L)."""
    return tuple(leaf // math.prod(branching[i + 1:]) for i in range(len(branching)))


def unit_prefix(unit: dict) -> str:
    return f"shards/{unit['split']}-{unit['unit']:05d}"


class _Readers(OrderedDict):
    """Open routed files, least recently used closed first."""

    def __init__(self, work: Work):
        super().__init__()
        self.work = work

    def get_file(self, f: int) -> RoutedFile:
        if f in self:
            self.move_to_end(f)
            return self[f]
        if len(self) >= _OPEN_FILES:
            self.popitem(last=False)[1].close()
        self[f] = RoutedFile(self.work.routed(f))
        return self[f]

    def close(self) -> None:
        while self:
            self.popitem()[1].close()


def _unit_rows(work: Work, unit: dict, num_files: int, num_leaves: int) -> np.ndarray:
    """int64 [r, 4] (leaf, file, first doc, end doc) of the unit, by leaf then file."""
    code = SPLITS.index(unit["split"])
    low, high = code * num_leaves + unit["leaf_start"], code * num_leaves + unit["leaf_stop"]
    rows = []
    for f in range(num_files):
        groups = np.load(work.routed(f) / "groups.npy", allow_pickle=False)
        keys = groups[:, 2]
        sel = groups[np.searchsorted(keys, low):np.searchsorted(keys, high)]
        if len(sel):
            rows.append(np.stack([sel[:, 1], np.full(len(sel), f), sel[:, 3], sel[:, 4]], axis=1))
    if not rows:
        return np.zeros((0, 4), dtype=np.int64)
    rows = np.concatenate(rows)
    return rows[np.lexsort((rows[:, 1], rows[:, 0]))]


def pack_unit(work: Work, unit: dict, *, num_files: int, branching: Sequence[int], seq_len: int,
              shard_samples: int, eot_id: int, pad_id: int) -> dict:
    """Pack one unit into its shards (replacing any a killed attempt left); record and return them."""
    num_leaves = math.prod(branching)
    prefix = unit_prefix(unit)
    for leftover in (work.out / prefix).parent.glob(f"{Path(prefix).name}-*"):
        leftover.unlink()
    rows = _unit_rows(work, unit, num_files, num_leaves)
    readers = _Readers(work)
    num_docs = int((rows[:, 3] - rows[:, 2]).sum())

    def documents(leaf_rows) -> Iterator[tuple[str, np.ndarray]]:
        for _, f, start, end in leaf_rows:
            yield from readers.get_file(int(f)).documents(int(start), int(end))

    try:
        with ShardWriter(work.out, prefix, max_samples=shard_samples) as writer:
            for leaf, leaf_rows in groupby(rows.tolist(), key=lambda row: row[0]):
                for seq in pack_leaf(documents(leaf_rows), path=leaf_path(leaf, branching), seq_len=seq_len,
                                     eot_id=eot_id, pad_id=pad_id):
                    writer.write(seq)
            shards = writer.close()
    finally:
        readers.close()
    files = {}
    for entry in shards:
        for key in ("file", "index"):
            path = work.out / entry[key]
            files[entry[key]] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    record = {**unit, "documents": num_docs, "shards": shards, "files": files}
    write_json(work.packed(unit), record)
    return record
