"""ShardLoader: determinism, exact resume, rank split, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hmtrain.data.loader import ShardLoader
from hmtrain.data.packing import IGNORE_INDEX, PackedSequence, pack_leaf
from hmtrain.data.shards import ShardWriter, list_shards, read_shard

pytestmark = pytest.mark.timeout(60)  # a cursor bug shows up as an endless loop

EOT, PAD = 1, 0
SEQ_LEN = 6
# Samples per level-1 subtree; with max_samples=4 this makes 7 shards, 22 samples.
SUBTREE_SIZES = {0: 8, 1: 9, 2: 5}
TOTAL = sum(SUBTREE_SIZES.values())


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    # Every sample's first token is its unique id (see _write_shards).
    return batch["tokens"][:, 0].tolist()


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[dict]]:
    sample_id = 2  # ids start above EOT and PAD
    with ShardWriter(tmp_path, "train", max_samples=4) as w:
        for subtree, n in SUBTREE_SIZES.items():
            for _ in range(n):
                tokens = np.arange(sample_id, sample_id + SEQ_LEN + 1, dtype=np.int32) % 1000 + 2
                tokens[0] = sample_id
                w.write(PackedSequence(tokens, (subtree, subtree * 3 + 1), [f"doc{sample_id}"], SEQ_LEN + 1))
                sample_id += 1
    entries = w.close()
    assert len(entries) == 7
    return tmp_path, entries


def _loader(shards: tuple[Path, list[dict]], **kw) -> ShardLoader:
    root, entries = shards
    args = dict(batch_size=5, seed=3, eot_id=EOT, pad_id=PAD)
    args.update(kw)
    return ShardLoader(root, entries, **args)


def _take(loader: ShardLoader, n: int) -> list[tuple[dict[str, torch.Tensor], dict]]:
    out = []
    for item in loader:
        out.append(item)
        if len(out) == n:
            break
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_deterministic_for_a_seed(shards) -> None:
    first = [_ids(b) for b, _ in _take(_loader(shards), 10)]
    again = [_ids(b) for b, _ in _take(_loader(shards), 10)]
    other = [_ids(b) for b, _ in _take(_loader(shards, seed=4), 10)]
    assert first == again
    assert first != other


def test_batch_fields(shards) -> None:
    batch, state = next(iter(_loader(shards)))
    assert batch["tokens"].shape == batch["labels"].shape == batch["segments"].shape == (5, SEQ_LEN)
    assert batch["paths"].shape == (5, 2)
    assert all(v.dtype == torch.int64 for v in batch.values())
    # path[1] = 3 * path[0] + 1 was written for every sample.
    assert torch.equal(batch["paths"][:, 1], 3 * batch["paths"][:, 0] + 1)
    json.dumps(state)  # plain JSON-able values


def test_each_epoch_covers_every_sample_once(shards) -> None:
    ids = [i for b, _ in _take(_loader(shards, batch_size=1), 3 * TOTAL) for i in _ids(b)]
    expected = list(range(2, 2 + TOTAL))
    for e in range(3):
        assert sorted(ids[e * TOTAL : (e + 1) * TOTAL]) == expected
    assert ids[:TOTAL] != ids[TOTAL : 2 * TOTAL]  # reshuffled per epoch
    assert ids[:TOTAL] != expected  # shuffled at all


def test_shard_order_reshuffled_per_epoch(shards) -> None:
    root, entries = shards
    shard_of = {int(s["tokens"][0]): i for i, e in enumerate(entries) for s in read_shard(root / e["file"])}
    ids = [i for b, _ in _take(_loader(shards, batch_size=1), 2 * TOTAL) for i in _ids(b)]
    visits = [[shard_of[i] for i in ids[e * TOTAL : (e + 1) * TOTAL]] for e in range(2)]
    # A shard is read whole before the next one starts: runs of one shard id.
    orders = [list(dict.fromkeys(v)) for v in visits]
    assert all(sorted(o) == list(range(len(entries))) for o in orders)
    assert all(len([k for k, j in zip(v, v[1:]) if k != j]) == len(entries) - 1 for v in visits)
    assert orders[0] != orders[1]
    # Each shard gets its own sample order: the 4-sample shards are not all permuted alike.
    first = {i: min(j for j in shard_of if shard_of[j] == i) for i in range(len(entries))}
    patterns = {
        tuple(j - first[i] for j in ids[:TOTAL] if shard_of[j] == i)
        for i, e in enumerate(entries)
        if e["samples"] == 4
    }
    assert len(patterns) > 1


@pytest.mark.parametrize("save_after", [3, 5])  # 5 batches of 5 cross the 22-sample epoch
@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1), (10, 7)])
def test_exact_resume(shards, save_after: int, world_size: int, rank: int) -> None:
    run = _take(_loader(shards, world_size=world_size, rank=rank), 9)
    state = json.loads(json.dumps(run[save_after - 1][1]))  # as stored in a checkpoint
    resumed = _loader(shards, world_size=world_size, rank=rank)
    resumed.load_state_dict(state)
    rest = _take(resumed, 9 - save_after)
    assert len(rest) == 9 - save_after
    for (a, sa), (b, sb) in zip(run[save_after:], rest):
        _assert_same(a, b)
        assert sa == sb


def test_state_dict_tracks_last_yielded_batch(shards) -> None:
    loader = _loader(shards)
    it = iter(loader)
    _, state = next(it)
    assert loader.state_dict() == state
    assert state["epoch"] == 0 and (state["shard_cursor"], state["sample_cursor"]) != (0, 0)
    first_epoch = _take(_loader(shards, batch_size=TOTAL), 1)[0][1]
    assert (first_epoch["epoch"], first_epoch["shard_cursor"], first_epoch["sample_cursor"]) == (1, 0, 0)


@pytest.mark.parametrize("world_size", [2, 3, 10, 30])  # 10 and 30 > 7 shards: samples are strided
def test_ranks_are_disjoint_and_cover_the_epoch(shards, world_size: int) -> None:
    if world_size == 30:  # more ranks than samples: the ranks without any are refused
        with pytest.raises(ValueError, match="no samples"):
            _loader(shards, world_size=30, rank=TOTAL)
        return
    per_rank = []
    for rank in range(world_size):
        loader = _loader(shards, world_size=world_size, rank=rank, infinite=False)
        per_rank.append([i for b, _ in loader for i in _ids(b)])
    all_ids = [i for ids in per_rank for i in ids]
    assert len(all_ids) == len(set(all_ids)) == TOTAL
    assert all(per_rank)


def test_finite_stops_after_one_epoch_with_partial_batch(shards) -> None:
    batches = [b for b, _ in _loader(shards, batch_size=5, infinite=False)]
    assert [len(_ids(b)) for b in batches] == [5, 5, 5, 5, 2]


def test_no_shuffle_keeps_manifest_order(shards) -> None:
    loader = _loader(shards, shuffle=False, infinite=False, batch_size=4)
    ids = [i for b, _ in loader for i in _ids(b)]
    assert ids == list(range(2, 2 + TOTAL))


def test_state_from_other_config_rejected(shards) -> None:
    _, state = next(iter(_loader(shards)))
    with pytest.raises(ValueError, match="seed was 3, this loader has 4"):
        _loader(shards, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        _loader(shards, world_size=2).load_state_dict(state)
    root, entries = shards
    other = ShardLoader(root, entries[:-1], batch_size=5, seed=3, eot_id=EOT, pad_id=PAD)
    with pytest.raises(ValueError, match="shard list"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        _loader(shards).load_state_dict({**state, "sample_cursor": 99})


def test_segments_and_labels_through_loader(tmp_path: Path) -> None:
    docs = [("a", [5, 6]), ("b", [7, 8, 9])]  # stream 5 6 E 7 8 9 E, then padding
    (seq,) = pack_leaf(docs, path=(1, 2), seq_len=8, eot_id=EOT, pad_id=PAD)
    with ShardWriter(tmp_path, "train") as w:
        w.write(seq)
    loader = ShardLoader(tmp_path, w.close(), batch_size=1, seed=0, eot_id=EOT, pad_id=PAD)
    batch, _ = next(iter(loader))
    X = IGNORE_INDEX
    assert batch["tokens"].tolist() == [[5, 6, EOT, 7, 8, 9, EOT, PAD]]
    assert batch["labels"].tolist() == [[6, EOT, 7, 8, 9, EOT, X, X]]
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert batch["paths"].tolist() == [[1, 2]]


def test_crashed_shard_is_not_loaded(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", max_samples=2) as w:
        for i in range(2):
            w.write(PackedSequence(np.full(SEQ_LEN + 1, 10 + i, dtype=np.int32), (0, 0), [], SEQ_LEN + 1))
    crashed = ShardWriter(tmp_path, "train")  # a later run that died mid-shard
    crashed.write(PackedSequence(np.full(SEQ_LEN + 1, 99, dtype=np.int32), (1, 3), [], SEQ_LEN + 1))
    entries = list_shards(tmp_path, "train")
    assert [e["file"] for e in entries] == ["train-00000-00000.tar"]
    loader = ShardLoader(tmp_path, entries, batch_size=8, seed=0, eot_id=EOT, pad_id=PAD, infinite=False)
    assert sorted(i for b, _ in loader for i in _ids(b)) == [10, 11]
    crashed.abort()


def test_bad_shards_raise_naming_the_file(shards) -> None:
    root, entries = shards
    with pytest.raises(ValueError, match="no shards"):
        ShardLoader(root, [], batch_size=1, seed=0, eot_id=EOT, pad_id=PAD)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        missing = [*entries, {"file": "missing.tar", "samples": 1}]
        ShardLoader(root, missing, batch_size=1, seed=0, eot_id=EOT, pad_id=PAD)

    (root / entries[0]["file"]).write_bytes(b"garbage" * 100)
    loader = ShardLoader(root, entries, batch_size=TOTAL, seed=0, eot_id=EOT, pad_id=PAD, shuffle=False)
    with pytest.raises(ValueError, match=entries[0]["file"]):
        next(iter(loader))

    wrong_count = [{**entries[1], "samples": 3}]
    loader = ShardLoader(root, wrong_count, batch_size=1, seed=0, eot_id=EOT, pad_id=PAD)
    with pytest.raises(ValueError, match=f"{entries[1]['file']}.*holds 4 samples"):
        next(iter(loader))
