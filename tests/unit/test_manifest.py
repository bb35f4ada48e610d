"""The manifest: per-node counts, validation, atomic writes, and refusal of an older format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmtrain.data.format.manifest import node_counts, read_manifest, write_manifest


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
    with pytest.raises(ValueError, match=r"branching\[1\] must be >= 2, got 1"):
        node_counts([((0, 0), 1)], [2, 1])


def _manifest() -> dict:
    files = {name: {"bytes": 10, "sha256": "ab"} for name in (
        "shards/train-00000.tar", "shards/train-00000.idx.npy", "index/train.paths.npy", "index/train.real.npy",
        "index/train.shard.npy", "index/train.offset.npy")}
    return {
        "version": 2,
        "seq_len": 8,
        "branching": [2, 2],
        "splits": {"train": {
            "sequences": 3, "tokens": 27, "level1_offsets": [0, 3, 3],
            "shards": [{"file": "shards/train-00000.tar", "index": "shards/train-00000.idx.npy", "samples": 3}],
            "arrays": {k: f"index/train.{k}.npy" for k in ("paths", "real", "shard", "offset")},
        }},
        "files": files,
        "node_tokens": [[10, 0], [4, 6, 0, 0]],
        "node_documents": [[2, 0], [1, 1, 0, 0]],
    }


def test_manifest_round_trip_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_manifest(path, _manifest())
    assert read_manifest(path) == _manifest()
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no .tmp left


def _with_split(**changes) -> dict:
    m = _manifest()
    m["splits"]["train"].update(changes)
    return m


@pytest.mark.parametrize("manifest,message", [
    ({**_manifest(), "version": 1}, "manifest version 1, this hmtrain reads version 2; prepare the data again"),
    ({**_manifest(), "version": 7}, "manifest version 7"),
    ({k: v for k, v in _manifest().items() if k != "files"}, "'files'"),
    ({**_manifest(), "node_tokens": [[1, 2], [3]]}, "node_tokens"),
    ({**_manifest(), "branching": [2, 1]}, r"branching\[1\] must be >= 2, got 1"),
    (_with_split(level1_offsets=[0, 2, 2]), "level1_offsets"),
    (_with_split(sequences=4, level1_offsets=[0, 4, 4]), "shards hold 3 samples, sequences is 4"),
    (_with_split(arrays={"paths": "index/train.paths.npy"}), "arrays"),
    ({**_manifest(), "files": {}}, "shards/train-00000.tar is not in the manifest's files"),
])
def test_manifest_errors(tmp_path: Path, manifest: dict, message: str) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(ValueError, match=message):
        write_manifest(path, manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        read_manifest(path)


def test_unreadable_manifest(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt manifest"):
        read_manifest(path)
