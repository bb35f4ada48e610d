"""Shard writing and reading: rollover, per-shard index, webdataset naming, crash safety."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset

from hmtrain.data.format.shards import (
    INDEX_OFFSET,
    INDEX_PATH,
    INDEX_REAL,
    PackedSequence,
    ShardWriter,
    load_shard_index,
    read_shard,
)
from hmtrain.data.prepare.pack import pack_leaf

EOT, PAD = 1, 0


def _seq(path: tuple[int, ...], fill: int, seq_len: int = 8, real: int | None = None) -> PackedSequence:
    return PackedSequence(np.full(seq_len + 1, fill, dtype=np.int32), path, [f"doc{fill}"], real or seq_len + 1)


def test_writer_rolls_over_and_indexes_every_sample(tmp_path: Path) -> None:
    seqs = [_seq((i % 2, 2 * (i % 2)), fill=10 + i, real=9 - i % 3) for i in range(7)]
    with ShardWriter(tmp_path, "shards/train", max_samples=3) as w:
        for s in seqs:
            w.write(s)
    entries = w.close()
    assert entries == [
        {"file": f"shards/train-0000{i}.tar", "index": f"shards/train-0000{i}.idx.npy", "samples": n}
        for i, n in enumerate([3, 3, 1])
    ]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
        Path(e[k]).name for e in entries for k in ("file", "index"))

    written = iter(seqs)
    for e in entries:
        index = load_shard_index(tmp_path, e, levels=2)
        with open(tmp_path / e["file"], "rb") as f:
            for row in index:
                seq = next(written)
                f.seek(row[INDEX_OFFSET])  # the raw tokens, straight from the tar
                assert np.array_equal(np.frombuffer(f.read(4 * 9), dtype="<i4"), seq.tokens)
                assert row[INDEX_REAL] == seq.num_real and tuple(row[INDEX_PATH:]) == seq.path

    read = [s for e in entries for s in read_shard(tmp_path / e["file"])]
    keys = [s["key"] for s in read]
    assert keys == sorted(keys) and len(set(keys)) == 7 and all(len(k) == 10 and k.isdigit() for k in keys)
    for got, seq in zip(read, seqs, strict=True):
        assert got["tokens"].dtype == np.int32 and np.array_equal(got["tokens"], seq.tokens)
        assert got["path"].dtype == np.int64 and tuple(got["path"].tolist()) == seq.path
        assert got["docs"] == seq.doc_ids


def test_tar_is_a_webdataset_shard(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "heldout") as w:
        w.write(_seq((3, 7), fill=4))
    with tarfile.open(tmp_path / "heldout-00000.tar") as tar:
        assert sorted(tar.getnames()) == ["0000000000.docs.json", "0000000000.path.npy", "0000000000.tokens.npy"]
    (sample,) = list(webdataset.WebDataset(str(tmp_path / "heldout-00000.tar"), shardshuffle=False).decode())
    assert sample["path.npy"].tolist() == [3, 7] and sample["docs.json"] == ["doc4"]


def test_crashed_writer_leaves_no_final_shard(tmp_path: Path) -> None:
    # Simulate a killed process: samples written, never closed.
    w = ShardWriter(tmp_path, "train", max_samples=100)
    for i in range(3):
        w.write(_seq((0, 0), fill=i))
    assert [p.name for p in tmp_path.iterdir()] == ["train-00000.tar.tmp"]
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_exception_in_with_block_removes_tmp_keeps_committed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "train", max_samples=2) as w:
            for i in range(3):  # first shard commits at 2, the third sample stays in .tmp
                w.write(_seq((0, 0), fill=i))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.idx.npy", "train-00000.tar"]


def test_index_is_renamed_before_its_tar(tmp_path: Path, monkeypatch) -> None:
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(b).name), real(a, b)))
    with ShardWriter(tmp_path, "train") as w:
        w.write(_seq((0, 0), fill=1))
    assert renamed == ["train-00000.idx.npy", "train-00000.tar"]  # a final-named tar has its index


def test_writer_rejects_inconsistent_sequences(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train") as w:
        w.write(_seq((0, 0), fill=1, seq_len=8))
        with pytest.raises(ValueError, match="seq_len"):
            w.write(_seq((0, 0), fill=1, seq_len=4))
        with pytest.raises(ValueError, match="int32"):
            w.write(PackedSequence(np.zeros(9, dtype=np.int64), (0, 0), [], 9))
        with pytest.raises(ValueError, match="num_real"):
            w.write(PackedSequence(np.zeros(9, dtype=np.int32), (0, 0), [], 0))
    for prefix in ("../train", "tr.ain", "/abs"):
        with pytest.raises(ValueError, match="prefix"):
            ShardWriter(tmp_path, prefix)


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        read_shard(tmp_path / "nope.tar")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ValueError, match="bad.tar"):
        read_shard(bad)
    (tmp_path / "x.idx.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="x.idx.npy"):
        load_shard_index(tmp_path, {"index": "x.idx.npy", "samples": 1}, levels=2)
    np.save(tmp_path / "y.idx.npy", np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=r"y.idx.npy.*expected int64 \(3, 4\)"):
        load_shard_index(tmp_path, {"index": "y.idx.npy", "samples": 3}, levels=2)


def test_packed_leaf_survives_shard_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    docs = [(f"d{i}", rng.integers(2, 99, size=int(rng.integers(1, 30))).tolist()) for i in range(20)]
    seqs = list(pack_leaf(docs, path=(1, 3), seq_len=16, eot_id=EOT, pad_id=PAD))
    with ShardWriter(tmp_path, "train", max_samples=4) as w:
        for s in seqs:
            w.write(s)
    read = [s for e in w.close() for s in read_shard(tmp_path / e["file"])]
    assert [s["docs"] for s in read] == [s.doc_ids for s in seqs]
    stream = np.concatenate([s["tokens"] for s in read])
    assert np.array_equal(stream, np.concatenate([s.tokens for s in seqs]))
