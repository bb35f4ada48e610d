"""Shard writing and reading, crash safety, manifest helpers."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hmtrain.data.packing import PackedSequence, pack_leaf
from hmtrain.data.shards import (
    ShardWriter,
    list_shards,
    node_counts,
    read_manifest,
    read_shard,
    write_manifest,
)

EOT, PAD = 1, 0


def _seq(path: tuple[int, ...], fill: int, seq_len: int = 8) -> PackedSequence:
    return PackedSequence(np.full(seq_len + 1, fill, dtype=np.int32), path, [f"doc{fill}"], seq_len + 1)


def test_writer_groups_by_subtree_and_rolls_over(tmp_path: Path) -> None:
    # Subtrees interleaved on purpose: each still gets its own files.
    seqs = [_seq((i % 2, 2 * (i % 2)), fill=i) for i in range(7)]
    with ShardWriter(tmp_path, "train", max_samples=2) as w:
        for s in seqs:
            w.write(s)
    entries = w.close()
    assert entries == [
        {"file": "train-00000-00000.tar", "samples": 2, "subtree": 0},
        {"file": "train-00000-00001.tar", "samples": 2, "subtree": 0},
        {"file": "train-00001-00000.tar", "samples": 2, "subtree": 1},
        {"file": "train-00001-00001.tar", "samples": 1, "subtree": 1},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [e["file"] for e in entries]
    assert list_shards(tmp_path, "train") == entries

    read = [s for e in entries for s in read_shard(tmp_path / e["file"])]
    keys = [s["key"] for s in read]
    assert len(set(keys)) == 7 and all(len(k) == 10 and k.isdigit() for k in keys)
    by_fill = {int(s["tokens"][0]): s for s in read}
    for i, seq in enumerate(seqs):
        got = by_fill[i]
        assert got["tokens"].dtype == np.int32 and np.array_equal(got["tokens"], seq.tokens)
        assert got["path"].dtype == np.int64 and tuple(got["path"].tolist()) == seq.path
        assert got["docs"] == seq.doc_ids
    for e in entries:
        assert {int(s["path"][0]) for s in read_shard(tmp_path / e["file"])} == {e["subtree"]}


def test_tar_members_follow_webdataset_naming(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "heldout") as w:
        w.write(_seq((3, 7), fill=4))
    with tarfile.open(tmp_path / "heldout-00003-00000.tar") as tar:
        assert sorted(tar.getnames()) == [
            "0000000000.docs.json",
            "0000000000.path.npy",
            "0000000000.tokens.npy",
        ]


def test_crashed_writer_leaves_no_final_shard(tmp_path: Path) -> None:
    # Simulate a killed process: samples written, never closed.
    w = ShardWriter(tmp_path, "train", max_samples=100)
    for i in range(3):
        w.write(_seq((0, 0), fill=i))
    names = [p.name for p in tmp_path.iterdir()]
    assert names == ["train-00000-00000.tar.tmp"]
    assert list_shards(tmp_path, "train") == []
    w.abort()


def test_exception_in_with_block_removes_tmp_keeps_committed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "train", max_samples=2) as w:
            for i in range(3):  # first shard commits at 2, the third sample stays in .tmp
                w.write(_seq((0, 0), fill=i))
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["train-00000-00000.tar"]
    assert list_shards(tmp_path, "train") == [{"file": "train-00000-00000.tar", "samples": 2, "subtree": 0}]


def test_writer_rejects_inconsistent_sequences(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train") as w:
        w.write(_seq((0, 0), fill=1, seq_len=8))
        with pytest.raises(ValueError, match="seq_len"):
            w.write(_seq((0, 0), fill=1, seq_len=4))
        with pytest.raises(ValueError, match="int32"):
            w.write(PackedSequence(np.zeros(9, dtype=np.int64), (0, 0), [], 9))
    with pytest.raises(ValueError, match="split"):
        ShardWriter(tmp_path, "tr-ain")


def test_read_shard_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        read_shard(tmp_path / "nope.tar")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ValueError, match="bad.tar"):
        read_shard(bad)


def test_packed_leaf_survives_shard_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    docs = [(f"d{i}", rng.integers(2, 99, size=int(rng.integers(1, 30))).tolist()) for i in range(20)]
    seqs = list(pack_leaf(docs, path=(1, 3), seq_len=16, eot_id=EOT, pad_id=PAD))
    with ShardWriter(tmp_path, "train", max_samples=4) as w:
        for s in seqs:
            w.write(s)
    entries = w.close()
    read = [s for e in entries for s in read_shard(tmp_path / e["file"])]
    assert [s["docs"] for s in read] == [s.doc_ids for s in seqs]
    stream = np.concatenate([s["tokens"] for s in read])
    assert np.array_equal(stream, np.concatenate([s.tokens for s in seqs]))


def test_node_counts_aggregates_every_level() -> None:
    branching = [2, 3]
    counts = node_counts([((0, 1), 5), ((0, 2), 7), ((1, 4), 11), ((0, 1), 1)], branching)
    assert counts == [[13, 11], [0, 6, 7, 0, 11, 0]]
    with pytest.raises(ValueError, match="parent"):
        node_counts([((0, 4), 1)], branching)  # node 4 at level 1 belongs to parent 1
    with pytest.raises(ValueError, match="levels"):
        node_counts([((0,), 1)], branching)
    with pytest.raises(ValueError, match="outside"):
        node_counts([((2, 6), 1)], branching)


def _manifest() -> dict:
    return {
        "version": 1,
        "seq_len": 8,
        "branching": [2, 2],
        "splits": {"train": [{"file": "train-00000-00000.tar", "samples": 3, "subtree": 0}], "heldout": []},
        "node_tokens": [[10, 0], [4, 6, 0, 0]],
        "node_documents": [[2, 0], [1, 1, 0, 0]],
        "tokenizer": "tok",
        "tree": "tree.npz",
    }


def test_manifest_round_trip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_manifest(path, _manifest())
    assert read_manifest(path) == _manifest()
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no .tmp left


def test_manifest_errors(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest"):
        read_manifest(path)
    path.write_text(json.dumps({**_manifest(), "version": 7}))
    with pytest.raises(ValueError, match="version 7"):
        read_manifest(path)
    bad_counts = {**_manifest(), "node_tokens": [[1, 2], [3]]}
    with pytest.raises(ValueError, match="node_tokens"):
        write_manifest(path, bad_counts)
    no_splits = {k: v for k, v in _manifest().items() if k != "splits"}
    with pytest.raises(ValueError, match="splits"):
        write_manifest(path, no_splits)
