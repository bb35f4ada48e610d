"""One split of a prepared directory as sequences numbered 0..N-1: the merged index, and reads by id.

`write_split_index` merges the per-shard indexes (shards.py) into one row per sequence, grouped
by level-1 node (so a level-1 subtree is one contiguous range of ids), one shard index in memory
at a time:
  index/{split}.paths.npy   int32 [N, L]  the sequence's path
  index/{split}.real.npy    int32 [N]     real (non-padding) tokens
  index/{split}.shard.npy   int32 [N]     position of its shard in the split's shard list
  index/{split}.offset.npy  int64 [N]     byte offset of its raw int32 tokens in that shard

`Sequences` memory-maps these arrays and reads a sequence's seq_len + 1 tokens with one `pread` (shards.read_tokens).
It holds no per-sequence Python objects, and pickles without its open files, so DataLoader
workers reopen them lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from torch import Tensor

from hmtrain.data.format.manifest import ARRAYS
from hmtrain.data.format.shards import INDEX_OFFSET, INDEX_PATH, INDEX_REAL, load_shard_index, read_tokens
from hmtrain.data.loading.batch import batch_from_arrays, padding_batch
from hmtrain.util.files import atomic_path

_DTYPES = {"paths": np.int32, "real": np.int32, "shard": np.int32, "offset": np.int64}
_MAX_OPEN = 128  # open shard files kept per process


def _open_out(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def write_split_index(root: Path, split: str, shards: list[dict], *, branching: Sequence[int],
                      array_dir: str = "index") -> dict:
    """Merge the shards' indexes into the split's arrays; return the manifest's entry for the split."""
    root, levels, k1 = Path(root), len(branching), int(branching[0])
    counts = np.zeros(k1, dtype=np.int64)
    tokens = 0
    for entry in shards:  # pass 1: sequences per level-1 node
        index = load_shard_index(root, entry, levels)
        level1 = index[:, INDEX_PATH]
        if level1.min() < 0 or level1.max() >= k1:
            raise ValueError(f"{root / entry['index']}: level-1 node outside [0, {k1})")
        counts += np.bincount(level1, minlength=k1)
        tokens += int(index[:, INDEX_REAL].sum())
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])

    names = {key: f"{array_dir}/{split}.{key}.npy" for key in ARRAYS}
    (root / array_dir).mkdir(parents=True, exist_ok=True)
    with ExitStack() as renamed_when_done:
        tmp = {key: renamed_when_done.enter_context(atomic_path(root / names[key])) for key in ARRAYS}
        _merge_rows(root, shards, levels, k1, offsets, {
            key: _open_out(tmp[key], _DTYPES[key], (n, levels) if key == "paths" else (n,)) for key in ARRAYS})
    return {"sequences": n, "tokens": tokens, "level1_offsets": offsets.tolist(), "shards": list(shards),
            "arrays": names}


def _merge_rows(root: Path, shards: list[dict], levels: int, k1: int, offsets: np.ndarray,
                out: dict[str, np.memmap]) -> None:
    """Pass 2 of `write_split_index`: every shard's rows to their places, written through to disk."""
    cursor = offsets[:-1].copy()
    for shard_no, entry in enumerate(shards):  # pass 2: each row to its place within its level-1 node
        index = load_shard_index(root, entry, levels)
        level1 = index[:, INDEX_PATH]
        order = np.argsort(level1, kind="stable")
        grouped = level1[order]
        rank_in_node = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
        dest = cursor[grouped] + rank_in_node
        out["paths"][dest] = index[order, INDEX_PATH:]
        out["real"][dest] = index[order, INDEX_REAL]
        out["shard"][dest] = shard_no
        out["offset"][dest] = index[order, INDEX_OFFSET]
        cursor += np.bincount(level1, minlength=k1)
    for key in ARRAYS:
        out[key].flush()
    out.clear()


class Sequences:
    """Random access to the sequences of one split, by id."""

    def __init__(self, root: Path, split: str, entry: dict, files: dict, *, seq_len: int, levels: int,
                 eot_id: int, pad_id: int):
        self.root, self.split, self.entry = Path(root), split, entry
        self.seq_len, self.levels, self.eot_id, self.pad_id = seq_len, levels, eot_id, pad_id
        self.num = int(entry["sequences"])
        self.level1_offsets = np.asarray(entry["level1_offsets"], dtype=np.int64)
        self.shard_files = [self.root / s["file"] for s in entry["shards"]]
        canon = [self.num, [[s["file"], s["samples"], files[s["file"]]["sha256"]] for s in entry["shards"]]]
        self.fingerprint = hashlib.sha256(json.dumps(canon).encode()).hexdigest()[:16]
        self._arrays: dict[str, np.ndarray] | None = None
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.num

    @property
    def num_level1(self) -> int:
        return len(self.level1_offsets) - 1

    # --- index ---------------------------------------------------------------

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays = {}
            for key in ARRAYS:
                path = self.root / self.entry["arrays"][key]
                try:
                    arr = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise ValueError(f"corrupt sequence index {path}: {e}") from e
                shape = (self.num, self.levels) if key == "paths" else (self.num,)
                if arr.dtype != _DTYPES[key] or arr.shape != shape:
                    raise ValueError(f"corrupt sequence index {path}: {arr.dtype} {arr.shape}, expected "
                                     f"{np.dtype(_DTYPES[key])} {shape}")
                arrays[key] = arr
            self._arrays = arrays
        return self._arrays

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num):
            raise ValueError(f"split {self.split!r} has sequences 0..{self.num - 1}, asked for "
                             f"{int(ids.min() if ids.min() < 0 else ids.max())}")
        return ids

    def paths(self, ids) -> np.ndarray:
        """int64 [B, L]."""
        return self.arrays["paths"][self._check_ids(ids)].astype(np.int64)

    def level1(self, ids) -> np.ndarray:
        """Level-1 node of each id, from the id ranges alone (no read)."""
        return np.searchsorted(self.level1_offsets, self._check_ids(ids), side="right") - 1

    def subtree_ranges(self, subtrees: Sequence[int]) -> list[tuple[int, int]]:
        """[start, stop) id ranges of the given level-1 nodes."""
        return [(int(self.level1_offsets[s]), int(self.level1_offsets[s + 1])) for s in subtrees]

    # --- tokens --------------------------------------------------------------

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN:
                os.close(self._fds.pop(next(iter(self._fds))))
            try:
                fd = os.open(self.shard_files[shard], os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {self.shard_files[shard]} is missing (listed in "
                                        f"{self.root / 'manifest.json'})") from None
            self._fds[shard] = fd
        return fd

    def tokens(self, ids) -> np.ndarray:
        """int32 [B, seq_len + 1]: each sequence's inputs and, shifted by one, its targets."""
        ids = self._check_ids(ids)
        arrays = self.arrays
        width = self.seq_len + 1
        out = np.empty((ids.size, width), dtype=np.int32)
        shards, offsets = arrays["shard"][ids], arrays["offset"][ids]
        for row, (i, shard, offset) in enumerate(zip(ids.tolist(), shards.tolist(), offsets.tolist())):
            out[row] = read_tokens(self._fd(shard), offset, width,
                                   f"{self.shard_files[shard]}: sequence {i} of split {self.split!r}")
        return out

    def batch(self, ids) -> dict[str, Tensor]:
        """Model inputs for these sequences (see loading/batch.py), with `index` = the ids."""
        ids = self._check_ids(ids)
        if ids.size == 0:
            return padding_batch(self.seq_len, self.levels, self.pad_id)
        return batch_from_arrays(self.tokens(ids), self.paths(ids), eot_id=self.eot_id, pad_id=self.pad_id,
                                 index=ids)

    # --- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._arrays = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        # Open files and memory maps stay behind; the copy (a DataLoader worker) opens its own.
        return {**self.__dict__, "_arrays": None, "_fds": {}}
