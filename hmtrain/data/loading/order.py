"""The order a loader visits sequences in: a seeded permutation per epoch, O(1) memory, any position directly.

`Permutation` is a balanced Feistel network on the smallest even power of two >= n, keyed by
(seed, epoch), with cycle walking: a value that lands outside [0, n) is permuted again until it
lands inside, which keeps it a bijection of [0, n). Nothing is materialised, so position p of
epoch e costs a few integer operations whether n is ten or ten billion.

`StreamOrder` turns a global stream position into a sequence id: epoch e = position // size visits
the selected sequences (all of them, or the id ranges of some level-1 subtrees) once each.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_ROUNDS = 6
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixing function of uint64 values (wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A pseudo-random permutation of [0, n) for one (seed, epoch)."""

    def __init__(self, n: int, *, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        digest = hashlib.blake2b(f"hmtrain.order:{seed}:{epoch}".encode(), digest_size=8 * _ROUNDS).digest()
        self.keys = [np.uint64(int.from_bytes(digest[8 * i: 8 * i + 8], "little")) for i in range(_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions) -> np.ndarray:
        """int64 values at these positions (each in [0, n))."""
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise ValueError(f"positions must be in [0, {self.n})")
        with np.errstate(over="ignore"):
            out = self._encrypt(pos.astype(np.uint64))
            outside = out >= self.n
            while outside.any():
                out[outside] = self._encrypt(out[outside])
                outside = out >= self.n
        return out.astype(np.int64)


class StreamOrder:
    """Global stream position -> sequence id, over the ids in `ranges` ([start, stop) pairs)."""

    def __init__(self, ranges: Sequence[tuple[int, int]], *, seed: int, shuffle: bool = True):
        self.starts = np.asarray([start for start, _ in ranges], dtype=np.int64)
        lengths = np.asarray([stop - start for start, stop in ranges], dtype=np.int64)
        if (lengths < 0).any():
            raise ValueError(f"id ranges must have start <= stop, got {list(ranges)}")
        self.cum = np.concatenate([[0], np.cumsum(lengths)])
        self.size = int(self.cum[-1])
        if self.size == 0:
            raise ValueError("no sequences to visit: the id ranges are empty")
        self.seed, self.shuffle = seed, shuffle
        self._perm: Permutation | None = None
        self._perm_epoch = -1

    def _permutation(self, epoch: int) -> Permutation:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = Permutation(self.size, seed=self.seed, epoch=epoch), epoch
        assert self._perm is not None
        return self._perm

    def ids(self, start: int, stop: int) -> np.ndarray:
        """int64 ids at stream positions [start, stop), epochs crossed seamlessly."""
        if not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
        parts = []
        pos = start
        while pos < stop:
            epoch, first = divmod(pos, self.size)
            end = min(stop, (epoch + 1) * self.size)
            local = np.arange(first, first + end - pos, dtype=np.int64)
            if self.shuffle:
                local = self._permutation(epoch)(local)
            ranges = np.searchsorted(self.cum[1:], local, side="right")
            parts.append(self.starts[ranges] + local - self.cum[ranges])
            pos = end
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
