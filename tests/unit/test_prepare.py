"""`prepare` end to end on a small corpus: what it writes, overwrite and failure safety, warnings, verification."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from hmtrain.config import load_config
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.prepare.pipeline import prepare

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _corpus(path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40))).tolist())
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


def _cfg(tmp_path: Path, *overrides: str):
    return load_config("tiny", [
        "tree.branching=[2,3]", "memory.units=[4,4]", "data.seq_len=16", "data.embedder=hashing",
        "data.tokenizer=byte", "data.shard_samples=8", "data.heldout_fraction=0.2",
        f"data.documents={tmp_path / 'docs.jsonl.gz'}", f"data.prepared={tmp_path / 'prepared'}", *overrides])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def prepared(tmp_path: Path) -> PreparedData:
    _corpus(tmp_path / "docs.jsonl.gz")
    prepare(_cfg(tmp_path), progress=False)
    return PreparedData.open(tmp_path / "prepared", verify="checksums")


def test_sequences_hold_each_leafs_documents_in_order(prepared: PreparedData) -> None:
    docs = prepared.documents().to_pylist()
    texts = {}
    with gzip.open(prepared.manifest["source"], "rt") as f:
        for line in f:
            record = json.loads(line)
            texts[record["id"]] = record["text"]
    tok, eot = prepared.tokenizer, prepared.manifest["eot_id"]
    for split in ("train", "heldout"):
        sequences = prepared.sequences(split)
        ids = np.arange(len(sequences))
        paths, tokens = sequences.paths(ids), sequences.tokens(ids)
        real = np.asarray(sequences.arrays["real"])
        assert paths[:, 0].tolist() == sorted(paths[:, 0].tolist())  # grouped by level-1 node
        for leaf in {tuple(p) for p in paths.tolist()}:
            rows = [i for i in ids if tuple(paths[i]) == leaf]
            got = np.concatenate([tokens[i, : real[i]] for i in rows]).tolist()
            wanted = [t for d in docs if d["split"] == split and tuple(d["path"]) == leaf
                      for t in tok.encode(texts[d["id"]]) + [eot]]
            assert got == wanted, leaf
    manifest = prepared.manifest
    assert sum(manifest["splits"][s]["tokens"] for s in ("train", "heldout")) == sum(d["tokens"] for d in docs)
    assert sorted(manifest["files"]) == sorted(_snapshot(prepared.root).keys() - {"manifest.json"})


def test_failed_overwrite_keeps_the_old_directory(prepared: PreparedData, tmp_path: Path) -> None:
    before = _snapshot(prepared.root)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: record 1 has no text field"):
        prepare(_cfg(tmp_path, f"data.documents={bad}"), overwrite=True, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(_cfg(tmp_path), progress=False)
    assert _snapshot(prepared.root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "docs.jsonl.gz", "prepared"]

    prepare(_cfg(tmp_path, "data.seq_len=32"), overwrite=True, progress=False)
    assert PreparedData.open(prepared.root).manifest["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "docs.jsonl.gz", "prepared"]


def test_interrupted_swap_is_recovered(prepared: PreparedData, tmp_path: Path) -> None:
    before = _snapshot(prepared.root)
    old = tmp_path / "prepared.old"
    prepared.root.rename(old)  # killed between "old aside" and "new in"
    (tmp_path / "prepared.tmp").mkdir()
    with pytest.raises(FileNotFoundError, match="prepared.old"):
        PreparedData.open(prepared.root)
    with pytest.raises(FileExistsError):  # puts the old directory back, then refuses to replace it
        prepare(_cfg(tmp_path), progress=False)
    assert _snapshot(prepared.root) == before
    assert not old.exists() and not (tmp_path / "prepared.tmp").exists()


def test_a_damaged_directory_is_refused_at_open(prepared: PreparedData) -> None:
    shard = prepared.root / prepared.manifest["splits"]["train"]["shards"][-1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard} holds {len(data) // 2} bytes"):
        PreparedData.open(prepared.root)
    shard.write_bytes(data[:-600] + b"\xff" * 600)
    PreparedData.open(prepared.root)  # same size: sizes cannot tell
    with pytest.raises(ValueError, match=f"{shard}: sha256 differs"):
        PreparedData.open(prepared.root, verify="checksums")
    shard.write_bytes(data)
    (prepared.root / "tree.pt").unlink()
    with pytest.raises(FileNotFoundError, match="tree.pt is missing"):
        PreparedData.open(prepared.root)
    PreparedData.open(prepared.root, verify=None)  # on request only


def test_warnings_for_a_tree_larger_than_the_data_and_no_heldout(tmp_path: Path, caplog) -> None:
    _corpus(tmp_path / "docs.jsonl.gz", n=20)
    with caplog.at_level(logging.WARNING, logger="hmtrain.data.prepare.pipeline"):
        prepare(_cfg(tmp_path, "tree.branching=[4,8]", "memory.units=[4,4]", "data.heldout_fraction=0"),
                progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("32 leaves for 20 training documents" in m for m in messages), messages
    assert any("heldout_fraction=0" in m and "hmtrain eval" in m for m in messages), messages
    data = PreparedData.open(tmp_path / "prepared")
    assert data.splits["heldout"] == 0
    with pytest.raises(ValueError, match="no held-out sequences"):
        data.sequences("heldout")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hmtrain.data.prepare.pipeline"):
        prepare(_cfg(tmp_path), overwrite=True, progress=False)
    assert not caplog.records


def test_output_under_a_file_fails_before_reading(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    cfg = _cfg(tmp_path, f"data.prepared={tmp_path / 'blocker' / 'prepared'}", "data.documents=/nonexistent")
    with pytest.raises(ValueError, match=r"data.prepared.*blocker is a file, not a directory"):
        prepare(cfg, progress=False)
