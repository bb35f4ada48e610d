"""The merged sequence index and reads by id: grouping by level-1 node, tokens, paths, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from hmtrain.data.format.shards import read_shard
from tests.unit.prepared_helper import make_prepared

BRANCHING = [3, 2]
COUNTS = {(0, 0): 3, (0, 1): 2, (1, 3): 4, (2, 4): 1, (2, 5): 3}  # level-1 node 1 has no (1, 2) leaf


@pytest.fixture
def data(tmp_path: Path):
    # Written round-robin over leaves, 3 per shard: every shard mixes level-1 nodes.
    return make_prepared(tmp_path, COUNTS, branching=BRANCHING, seq_len=5, shard_samples=3, interleave=True)


def test_ids_are_grouped_by_level1_node_and_read_back_exactly(data) -> None:
    entry = data.manifest["splits"]["train"]
    sequences = data.sequences("train")
    assert len(sequences) == entry["sequences"] == 13
    assert entry["level1_offsets"] == [0, 5, 9, 13]
    ids = np.arange(13)
    paths = sequences.paths(ids)
    assert paths[:, 0].tolist() == [0] * 5 + [1] * 4 + [2] * 4
    assert sequences.level1(ids).tolist() == paths[:, 0].tolist()
    assert sequences.subtree_ranges([2, 0]) == [(9, 13), (0, 5)]

    # Every sample of every shard is one id, with its tokens and path; within a node, in write order.
    written = [s for e in entry["shards"] for s in read_shard(data.root / e["file"])]
    by_tag = {int(s["tokens"][0]): s for s in written}
    tokens = sequences.tokens(ids)
    assert sorted(tokens[:, 0].tolist()) == sorted(by_tag)
    for row, tag in enumerate(tokens[:, 0].tolist()):
        assert np.array_equal(tokens[row], by_tag[tag]["tokens"])
        assert paths[row].tolist() == by_tag[tag]["path"].tolist()
    for node in range(3):
        tags = tokens[sequences.level1(ids) == node, 0]
        assert tags.tolist() == sorted(tags.tolist())
    assert entry["tokens"] == int(np.asarray(data.sequences("train").arrays["real"]).sum()) == 13 * 6


def test_batch_and_bad_ids(data) -> None:
    sequences = data.sequences("train")
    batch = sequences.batch([4, 0, 12])
    assert batch["index"].tolist() == [4, 0, 12] and batch["tokens"].shape == (3, 5)
    assert sequences.batch([])["tokens"].shape == (0, 5)
    with pytest.raises(ValueError, match="sequences 0..12, asked for 13"):
        sequences.tokens([13])
    with pytest.raises(ValueError, match="asked for -1"):
        sequences.paths([-1])


def test_pickles_without_open_files(data) -> None:
    sequences = data.sequences("train")
    first = sequences.tokens([3, 7])
    assert sequences._fds and sequences._arrays is not None
    copy = pickle.loads(pickle.dumps(sequences))
    assert copy._fds == {} and copy._arrays is None
    assert np.array_equal(copy.tokens([3, 7]), first)
    sequences.close()


def test_truncated_shard_is_named_when_read(data) -> None:
    sequences = data.sequences("train")
    shard = sequences.shard_files[-1]
    with open(shard, "r+b") as f:
        f.truncate(1024)  # the first sample's members survive, the rest is gone
    last = int(np.flatnonzero(sequences.arrays["shard"] == len(sequences.shard_files) - 1)[-1])
    with pytest.raises(ValueError, match=rf"{shard.name}: sequence {last} of split 'train' ends after 0 of 24 bytes"):
        sequences.tokens([last])


def test_index_arrays_that_do_not_match_the_manifest_are_refused(data) -> None:
    path = data.root / data.manifest["splits"]["train"]["arrays"]["real"]
    np.save(path, np.zeros(12, dtype=np.int32))
    with pytest.raises(ValueError, match=r"train.real.npy: int32 \(12,\), expected int32 \(13,\)"):
        data.sequences("train").batch([0])
