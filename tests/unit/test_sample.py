"""Stage 1's keys: the split rule, the bottom-k sample threshold, the bounded duplicate check."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from hmtrain.data.prepare import sample


def test_keys_are_the_split_rules_hash_and_the_same_in_every_call():
    ids = [f"doc{i}" for i in range(500)]
    keys = sample.doc_keys(ids, seed=3)
    assert keys.dtype == np.uint64 and np.array_equal(keys, sample.doc_keys(ids, seed=3))
    for doc_id, key in zip(ids[:20], keys[:20].tolist()):
        assert key == int.from_bytes(hashlib.blake2b(f"3:{doc_id}".encode(), digest_size=8).digest(), "little")
    held = sample.heldout_mask(keys, 0.3)
    assert held.tolist() == [int(k) / 2**64 < 0.3 for k in keys.tolist()]  # Python's exact rule
    assert 100 < held.sum() < 200
    assert not np.array_equal(keys, sample.doc_keys(ids, seed=4))


def test_threshold_selects_exactly_the_k_smallest_training_keys():
    rng = np.random.default_rng(0)
    files = [np.sort(rng.integers(0, 2**64, size=n, dtype=np.uint64)) for n in (0, 7, 300, 41)]
    everything = np.sort(np.concatenate(files))
    for k in (1, 5, 100, 347):
        limit = sample.threshold(files, k)
        assert sum(int((f <= limit).sum()) for f in files) == k
        assert limit == everything[k - 1]
    for k in (0, 348, 10_000):  # 0 = all; more than there are = all
        assert sample.threshold(files, k) == np.uint64(2**64 - 1)


def _keyed_files(tmp_path: Path, per_file: list[list[tuple[int, str]]]):
    """Files of (key, id) records: sorted keys and record numbers, as stage 1 stores them."""
    paths, arrays, ids = [], [], {}
    for f, records in enumerate(per_file):
        path = tmp_path / f"f{f}.jsonl"
        paths.append(path)
        keys = np.array([k for k, _ in records], dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        arrays.append((keys[order], order.astype(np.int64)))
        for r, (_, doc_id) in enumerate(records):
            ids[(path, r)] = doc_id
    return paths, (lambda i: arrays[i]), (lambda path, record: ids[(path, record)])


def test_duplicate_ids_are_named_with_both_records(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "_CHECK_BUCKET", 2)  # many key ranges on a small corpus
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**64, size=12, dtype=np.uint64).tolist()
    per_file = [[(keys[i], f"id{i}") for i in range(0, 6)], [(keys[i], f"id{i}") for i in range(6, 12)]]
    per_file[1].append((keys[2], "id2"))  # file 1 record 6 repeats file 0 record 2
    paths, load, read_id = _keyed_files(tmp_path, per_file)
    with pytest.raises(ValueError, match=r"duplicate document id 'id2': .*f1.jsonl: record 6 and .*f0.jsonl: record 2"):
        sample.check_unique(paths, load, read_id)


def test_equal_keys_of_different_ids_are_a_collision_not_a_duplicate(tmp_path):
    per_file = [[(5, "a"), (9, "b")], [(9, "c"), (2, "d")]]  # "b" and "c" share a key
    paths, load, read_id = _keyed_files(tmp_path, per_file)
    sample.check_unique(paths, load, read_id)
    per_file[1][0] = (9, "b")
    paths, load, read_id = _keyed_files(tmp_path, per_file)
    with pytest.raises(ValueError, match="duplicate document id 'b'"):
        sample.check_unique(paths, load, read_id)


def test_file_keys_reads_every_record_and_sorts(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"id": "d{i}", "text": "text {i}"}}\n' for i in range(50)))
    out = sample.file_keys(path, text_field="text", id_field="id", seed=0, fraction=0.2)
    keys = sample.doc_keys([f"d{i}" for i in range(50)], 0)
    assert np.array_equal(out["keys"], np.sort(keys)) and np.array_equal(keys[out["records"]], out["keys"])
    assert int(out["first_train"]) == int(sample.heldout_mask(keys, 0.2).sum())
    path.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": 3}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl: record 1: field 'text' must be a non-empty string"):
        sample.file_keys(path, text_field="text", id_field="id", seed=0, fraction=0.2)
