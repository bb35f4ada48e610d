"""Stage 1 of `prepare`: every document's key, the held-out split, id uniqueness, and the sample the
tree and the tokenizer are fitted on.

A document's key is a 64-bit hash of (data.seed, id). It decides everything about the document that
must not depend on the file order or the number of processes:
  split    held out when key / 2**64 < data.heldout_fraction (so the training keys are the larger ones)
  sample   the training documents with the k smallest keys ("bottom-k"): a uniform random sample of
           exactly k documents, the same whoever computes it, found without holding the corpus
  unique   equal ids have equal keys, so sorting the keys finds duplicates (checked on the ids)

Per input file the keys are stored sorted (`keys/NNNNN.keys.npy`, and `NNNNN.records.npy`: each key's
record number). The thresholds and the duplicate check then read those arrays, memory-mapped, a
bounded slice at a time.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hmtrain.data.corpus.documents import read_file

# Keys compared at once by the duplicate check: memory stays a few tens of MB whatever the corpus.
_CHECK_BUCKET = 1 << 22
_ALL = np.uint64(2**64 - 1)


def doc_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """uint64 key of each id (blake2b, so the same in every process and run)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64, count=len(ids))


def heldout_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    # float64(key) / 2**64 is exactly Python's int / 2**64: both round once, to nearest.
    return keys.astype(np.float64) / 2.0**64 < fraction


def file_keys(path: Path, *, text_field: str, id_field: str | None, seed: int, fraction: float,
              batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Read (and so validate) every record of one file; its keys sorted, their record numbers, and
    `first_train`, the position of the first training key (held-out keys are the smaller ones)."""
    parts = [doc_keys([d.id for d in batch], seed)
             for batch in read_file(path, text_field=text_field, id_field=id_field, batch_size=batch_size)]
    keys = np.concatenate(parts)
    records = np.argsort(keys, kind="stable")
    keys = keys[records]
    first_train = int(np.count_nonzero(heldout_mask(keys, fraction)))
    return {"keys": keys, "records": records.astype(np.int64), "first_train": np.int64(first_train)}


def threshold(train_keys: Sequence[np.ndarray], k: int) -> np.uint64:
    """The key of the k-th smallest training key over all files (the largest key when k is 0 or at
    least the number of training documents): the sample is every training key <= it."""
    total = sum(len(a) for a in train_keys)
    if k <= 0 or k >= total:
        return _ALL

    def count(t: int) -> int:
        value = np.uint64(t)
        return sum(int(np.searchsorted(a, value, side="right")) for a in train_keys)

    lo, hi = 0, 2**64 - 1
    while lo < hi:  # the smallest t with count(t) >= k; keys are distinct, so count(t) == k
        mid = (lo + hi) // 2
        if count(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return np.uint64(lo)


def check_unique(files: Sequence[Path], load: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 read_id: Callable[[Path, int], str]) -> None:
    """Raise ValueError naming both records when two documents share an id.

    The key space is cut into equal ranges of about _CHECK_BUCKET keys in all; each range's keys
    (a slice of every file's sorted array) are sorted together, and equal neighbours are compared
    on their ids (64-bit keys of different ids collide, rarely, on billions of documents).
    `load(f)` gives file f's (keys, records), memory-mapped: opened per range, so what is resident
    stays one range.
    """
    total = sum(len(load(f)[0]) for f in range(len(files)))
    buckets = max(1, math.ceil(total / _CHECK_BUCKET))
    edges = [np.uint64((2**64 * b) // buckets) for b in range(buckets)] + [None]
    for b in range(buckets):
        parts, owner, position = [], [], []
        for f in range(len(files)):
            a = load(f)[0]
            lo = int(np.searchsorted(a, edges[b], side="left"))
            hi = len(a) if edges[b + 1] is None else int(np.searchsorted(a, edges[b + 1], side="left"))
            if hi > lo:
                parts.append(np.asarray(a[lo:hi]))
                owner.append(np.full(hi - lo, f, dtype=np.int64))
                position.append(np.arange(lo, hi, dtype=np.int64))
        if not parts:
            continue
        cat = np.concatenate(parts)
        order = np.argsort(cat, kind="stable")
        same = np.flatnonzero(cat[order][1:] == cat[order][:-1])
        if same.size == 0:
            continue
        owner_all, position_all = np.concatenate(owner), np.concatenate(position)
        for i in same.tolist():
            (fa, pa), (fb, pb) = [(int(owner_all[order[j]]), int(position_all[order[j]])) for j in (i, i + 1)]
            ra, rb = int(load(fa)[1][pa]), int(load(fb)[1][pb])
            id_a = read_id(files[fa], ra)
            if id_a == read_id(files[fb], rb):
                first, second = sorted([(fa, ra), (fb, rb)])
                raise ValueError(f"duplicate document id {id_a!r}: {files[second[0]]}: record {second[1]} and "
                                 f"{files[first[0]]}: record {first[1]}")


def id_at(path: Path, record: int, *, text_field: str, id_field: str | None) -> str:
    """The id of one record (read from the start: only used for the rare equal keys)."""
    for batch in read_file(path, text_field=text_field, id_field=id_field, batch_size=4096):
        if batch[-1].index >= record:
            return batch[record - batch[0].index].id
    raise ValueError(f"{path}: has no record {record}")
