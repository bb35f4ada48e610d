"""Deterministic, exactly resumable shard loader, split by rank.

Each rank sees a stream of samples fixed by (seed, epoch, rank, world_size,
shard list); its position in that stream is three integers (epoch, shard
cursor, sample cursor). Every batch is yielded with the position right after
it (lingua-style), so a checkpoint stores that state and a restarted run
continues with exactly the next sample.

Per epoch the shard order is shuffled with (seed, epoch) and rank r takes
every world_size-th shard from r. With fewer shards than ranks, every rank
walks all shards and keeps the samples whose index in the epoch stream is
congruent to r modulo world_size. Inside a shard, samples are shuffled with
(seed, epoch, shard index).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from hmtrain.data.packing import make_batch
from hmtrain.data.shards import read_shard

# Domain tags keep the two kinds of seeds apart: numpy's SeedSequence maps
# [s, e] and [s, e, 0] to the same stream, so untagged lists could collide.
_TAG_SHARDS, _TAG_SAMPLES = 0, 1


def shards_fingerprint(shards: Sequence[dict]) -> str:
    """Short hash of the shard list (names, sizes, order): a resumed run must see the same list."""
    canon = json.dumps([[s["file"], s["samples"]] for s in shards], separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


class ShardLoader:
    """Yields (batch, state) pairs; see the module docstring for the order.

    The loader itself holds the position: `__iter__` continues from it and
    advances it, `state_dict` / `load_state_dict` save and restore it. Iterate
    one iterator at a time.
    """

    def __init__(
        self,
        root: Path,
        shards: Sequence[dict],
        *,
        batch_size: int,
        seed: int,
        eot_id: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
        shuffle: bool = True,
    ):
        self.root = Path(root)
        self.shards = [dict(s) for s in shards]
        if not self.shards:
            raise ValueError(f"ShardLoader: no shards given (root {self.root})")
        seen: set[str] = set()
        for i, s in enumerate(self.shards):
            if not isinstance(s.get("file"), str) or not isinstance(s.get("samples"), int):
                raise ValueError(f"shard entry {i} must have 'file' (str) and 'samples' (int): {s!r}")
            if s["samples"] < 1:
                raise ValueError(f"shard {s['file']} lists {s['samples']} samples, need >= 1")
            if s["file"] in seen:
                raise ValueError(f"shard {s['file']} is listed twice")
            seen.add(s["file"])
            if not (self.root / s["file"]).is_file():
                raise FileNotFoundError(f"shard not found: {self.root / s['file']}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if eot_id == pad_id:
            raise ValueError(f"eot_id and pad_id must differ, both are {eot_id}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.stride_samples = len(self.shards) < world_size
        total = sum(s["samples"] for s in self.shards)
        if self.stride_samples and total <= rank:
            raise ValueError(
                f"rank {rank} would get no samples: {total} samples in {len(self.shards)} shards "
                f"for world_size {world_size}"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.infinite = infinite
        self.shuffle = shuffle
        self.fingerprint = shards_fingerprint(self.shards)

        self.epoch = 0
        self.shard_cursor = 0
        self.sample_cursor = 0
        self._plan_epoch = -1
        self._plan: list[int] = []
        self._offsets: list[int] = []
        self._cache: tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None = None

    # --- order ---------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> list[int]:
        """Manifest indices of this rank's shards for `epoch`, in visiting order."""
        if self._plan_epoch != epoch:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, _TAG_SHARDS]).permutation(order)
            plan = [int(i) for i in order]
            if not self.stride_samples:
                plan = plan[self.rank :: self.world_size]
            # Index in the epoch stream of each plan entry's first sample (stride mode).
            sizes = [self.shards[i]["samples"] for i in plan]
            self._offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            self._plan, self._plan_epoch = plan, epoch
        return self._plan

    def _sample_order(self, epoch: int, shard: int) -> np.ndarray:
        n = self.shards[shard]["samples"]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, _TAG_SAMPLES, shard]).permutation(n)

    def _load(self, shard: int) -> list[tuple[np.ndarray, np.ndarray]]:
        # Only the current shard is kept: shards are small and visited once per epoch.
        if self._cache is None or self._cache[0] != shard:
            entry = self.shards[shard]
            path = self.root / entry["file"]
            samples = read_shard(path)
            if len(samples) != entry["samples"]:
                raise ValueError(
                    f"corrupt shard {path}: holds {len(samples)} samples, "
                    f"the manifest says {entry['samples']}"
                )
            self._cache = (shard, [(s["tokens"], s["path"]) for s in samples])
        return self._cache[1]

    def _samples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's samples from the current position; the cursors advance as each is yielded."""
        start_epoch = self.epoch
        while self.infinite or self.epoch == start_epoch:
            plan = self._epoch_plan(self.epoch)
            if self.shard_cursor >= len(plan):
                self.epoch, self.shard_cursor, self.sample_cursor = self.epoch + 1, 0, 0
                continue
            shard = plan[self.shard_cursor]
            order = self._sample_order(self.epoch, shard)
            data = self._load(shard)
            offset = self._offsets[self.shard_cursor]
            while self.sample_cursor < len(order):
                pos = self.sample_cursor
                self.sample_cursor += 1
                mine = not self.stride_samples or (offset + pos) % self.world_size == self.rank
                if mine:
                    sample = data[order[pos]]
                    self._normalize()
                    yield sample
                    if self.sample_cursor == 0:  # _normalize moved on to the next shard
                        break
            else:
                self.shard_cursor, self.sample_cursor = self.shard_cursor + 1, 0

    def _normalize(self) -> None:
        """Point at the next sample to read: a finished shard becomes (next shard, 0)."""
        plan = self._epoch_plan(self.epoch)
        if self.sample_cursor >= self.shards[plan[self.shard_cursor]]["samples"]:
            self.shard_cursor, self.sample_cursor = self.shard_cursor + 1, 0
            if self.shard_cursor >= len(plan):
                self.epoch, self.shard_cursor = self.epoch + 1, 0

    # --- iteration and state -------------------------------------------------

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], dict]]:
        batch: list[tuple[np.ndarray, np.ndarray]] = []
        for sample in self._samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield make_batch(batch, eot_id=self.eot_id, pad_id=self.pad_id), self.state_dict()
                batch = []
        if batch:  # only reached when infinite=False: the epoch's last, partial batch
            yield make_batch(batch, eot_id=self.eot_id, pad_id=self.pad_id), self.state_dict()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard_cursor": self.shard_cursor,
            "sample_cursor": self.sample_cursor,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size", "shuffle", "fingerprint"):
            if key not in state:
                raise ValueError(
                    f"loader state lacks {key!r}: not a ShardLoader state? keys: {sorted(state)}"
                )
            if state[key] != getattr(self, key):
                what = "shard list" if key == "fingerprint" else key
                raise ValueError(
                    f"loader state is from a different config: {what} was {state[key]!r}, "
                    f"this loader has {getattr(self, key)!r}"
                )
        try:
            epoch, shard_cursor, sample_cursor = (
                int(state["epoch"]), int(state["shard_cursor"]), int(state["sample_cursor"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"loader state has a missing or non-integer cursor: {e}") from e
        plan = self._epoch_plan(epoch) if epoch >= 0 else []
        if epoch < 0 or not 0 <= shard_cursor < len(plan) or not (
            0 <= sample_cursor < self.shards[plan[shard_cursor]]["samples"]
        ):
            raise ValueError(
                f"loader state position out of range: epoch {epoch}, shard_cursor {shard_cursor}, "
                f"sample_cursor {sample_cursor}"
            )
        self.epoch, self.shard_cursor, self.sample_cursor = epoch, shard_cursor, sample_cursor
