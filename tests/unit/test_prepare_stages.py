"""The staged prepare: a crash in any stage resumes without redoing finished input files or units,
and gives the same prepared directory as an uninterrupted run; the samples are of the stated size."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import hmtrain.data.prepare.pipeline as prepare_mod
from hmtrain.config import load_config
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.prepare import pack, sample
from hmtrain.data.prepare.pipeline import prepare
from hmtrain.data.prepare.work import work_dir_for
from hmtrain.data.routing.embed import HashingEmbedder

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _corpus(root: Path, files: int = 4, per_file: int = 15) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in range(files):
        with open(root / f"f{f}.jsonl", "w") as out:
            for i in range(per_file):
                text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 30))).tolist())
                out.write(json.dumps({"id": f"f{f}d{i}", "text": text}) + "\n")
    return root


def _cfg(tmp_path: Path, name: str = "prepared", *overrides: str):
    return load_config("tiny", [
        "tree.branching=[2,3]", "memory.units=[4,4]", "data.seq_len=16", "data.embedder=hashing",
        "data.tokenizer=byte", "data.shard_samples=4", "data.heldout_fraction=0.2",
        f"data.documents={tmp_path / 'docs'}", f"data.prepared={tmp_path / name}", *overrides])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Calls:
    """Wraps a function: records its calls, raises on call number `fail_on`."""

    def __init__(self, fn, fail_on: int | None = None):
        self.fn, self.fail_on, self.calls = fn, fail_on, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args[0] if args else None)
        if len(self.calls) == self.fail_on:
            raise RuntimeError("injected crash")
        return self.fn(*args, **kwargs)


@pytest.fixture
def clean(tmp_path: Path) -> dict[str, bytes]:
    """The prepared directory of an uninterrupted run."""
    _corpus(tmp_path / "docs")
    prepare(_cfg(tmp_path, "clean"), progress=False)
    return _snapshot(tmp_path / "clean")


# (module, function, crash on call number): stage 1 reads keys file by file, stage 2 routes file
# by file, stage 3 packs unit by unit.
STAGES = {"stage 1": (sample, "file_keys", 3), "stage 2": (prepare_mod, "route_file", 3),
          "stage 3": (pack, "pack_unit", 2)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_crash_resumes_without_redoing_finished_work(tmp_path: Path, clean, monkeypatch, stage: str) -> None:
    module, name, fail_on = STAGES[stage]
    real = getattr(module, name)
    monkeypatch.setattr(module, name, Calls(real, fail_on=fail_on))
    with pytest.raises(RuntimeError, match="injected crash"):
        prepare(_cfg(tmp_path), progress=False)
    work = work_dir_for(tmp_path / "prepared")
    assert work.is_dir() and not (tmp_path / "prepared").exists()
    with pytest.raises(FileNotFoundError, match="unfinished `hmtrain data prepare` left its work in .*prepared.work"):
        PreparedData.open(tmp_path / "prepared")
    assert not list(work.rglob("*.tmp")), "an unfinished file survived the crash under a temporary name"

    spies = {key: Calls(getattr(m, f)) for key, (m, f, _) in STAGES.items()}
    fit = Calls(prepare_mod.fit_tree)
    monkeypatch.setattr(prepare_mod, "fit_tree", fit)
    for key, (m, f, _) in STAGES.items():
        monkeypatch.setattr(m, f, spies[key])
    prepare(_cfg(tmp_path), progress=False)

    assert _snapshot(tmp_path / "prepared") == clean
    assert not work.exists()
    order = list(STAGES)
    for key in order[: order.index(stage)]:  # finished stages are never redone
        assert spies[key].calls == [], key
    assert fit.calls == ([] if stage != "stage 1" else [fit.calls[0]])
    done_before = fail_on - 1
    if stage == "stage 3":
        manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
        # shards/{split}-{unit}-{n}.tar: count the units
        total = len({s["file"].rsplit("-", 1)[0] for split in manifest["splits"].values() for s in split["shards"]})
        assert total >= 3
        assert len(spies[stage].calls) == total - done_before
    else:
        assert len(spies[stage].calls) == 4 - done_before  # 4 input files
        assert [Path(p).name for p in spies[stage].calls] == [f"f{i}.jsonl" for i in range(done_before, 4)]


def test_changed_input_discards_the_work(tmp_path: Path, monkeypatch, caplog) -> None:
    _corpus(tmp_path / "docs")
    monkeypatch.setattr(prepare_mod, "route_file", Calls(prepare_mod.route_file, fail_on=3))
    with pytest.raises(RuntimeError, match="injected crash"):
        prepare(_cfg(tmp_path), progress=False)
    with open(tmp_path / "docs" / "f0.jsonl", "a") as f:
        f.write(json.dumps({"id": "late", "text": "a document added after the crash"}) + "\n")
    spy = Calls(prepare_mod.route_file.fn)
    monkeypatch.setattr(prepare_mod, "route_file", spy)
    with caplog.at_level(logging.WARNING):
        prepare(_cfg(tmp_path), progress=False)
    assert any("discarding" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)
    assert len(spy.calls) == 4
    assert "late" in PreparedData.open(tmp_path / "prepared").documents().column("id").to_pylist()


def test_a_prepare_resumed_on_another_kind_of_device_starts_afresh(tmp_path: Path, monkeypatch, caplog) -> None:
    _corpus(tmp_path / "docs")
    monkeypatch.setattr(prepare_mod, "route_file", Calls(prepare_mod.route_file, fail_on=3))
    with pytest.raises(RuntimeError, match="injected crash"):
        prepare(_cfg(tmp_path), progress=False)
    monkeypatch.setattr(prepare_mod, "default_device", lambda: "cuda:0")  # resumed on a GPU machine
    spy = Calls(prepare_mod.route_file.fn)
    monkeypatch.setattr(prepare_mod, "route_file", spy)
    with caplog.at_level(logging.WARNING):
        prepare(_cfg(tmp_path), progress=False)
    assert any("discarding" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)
    assert len(spy.calls) == 4  # every file embedded again, on the one device


def test_bad_input_in_the_last_file_fails_before_routing_and_keeps_nothing(tmp_path: Path, clean, monkeypatch):
    (tmp_path / "docs" / "f3.jsonl").write_text('{"id": "x", "text": "fine"}\n{"id": "y", "text": "cut\n')
    spy = Calls(prepare_mod.route_file)
    monkeypatch.setattr(prepare_mod, "route_file", spy)
    with pytest.raises(ValueError, match=r"f3.jsonl: line 2 \(record 1\) is not valid JSON"):
        prepare(_cfg(tmp_path, "clean"), overwrite=True, progress=False)
    assert spy.calls == []
    assert _snapshot(tmp_path / "clean") == clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "docs"]


def test_duplicate_ids_across_files_are_named(tmp_path: Path) -> None:
    _corpus(tmp_path / "docs")
    with open(tmp_path / "docs" / "f2.jsonl", "a") as f:
        f.write(json.dumps({"id": "f0d7", "text": "the same id again"}) + "\n")
    duplicate = r"duplicate document id 'f0d7': .*f2.jsonl: record 15 and .*f0.jsonl: record 7"
    with pytest.raises(ValueError, match=duplicate):
        prepare(_cfg(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def _train_docs_by_key(root: Path, seed: int = 0, fraction: float = 0.2) -> list[tuple[int, int, int, str]]:
    """(key, file, record, text) of every training document, by key."""
    out = []
    for f in range(4):
        lines = [json.loads(line) for line in (root / f"f{f}.jsonl").read_text().splitlines()]
        keys = sample.doc_keys([r["id"] for r in lines], seed)
        for r, (line, key) in enumerate(zip(lines, keys.tolist())):
            if not sample.heldout_mask(np.array([key], dtype=np.uint64), fraction)[0]:
                out.append((key, f, r, line["text"]))
    return sorted(out)


def test_tree_and_tokenizer_see_samples_of_the_stated_size(tmp_path: Path, monkeypatch) -> None:
    _corpus(tmp_path / "docs")
    seen = {}
    real_fit, real_tok = prepare_mod.fit_tree, prepare_mod.train_tokenizer

    def fit(emb, *args, **kwargs):
        seen["tree"] = emb.clone()
        return real_fit(emb, *args, **kwargs)

    def tok(texts, **kwargs):
        seen["tokenizer"] = list(texts)
        return real_tok(seen["tokenizer"], **kwargs)

    monkeypatch.setattr(prepare_mod, "fit_tree", fit)
    monkeypatch.setattr(prepare_mod, "train_tokenizer", tok)
    prepare(_cfg(tmp_path, "prepared", "tree.fit_sample=10", "data.tokenizer=bpe", "data.tokenizer_vocab=300",
                 "data.tokenizer_sample=7"), progress=False)
    by_key = _train_docs_by_key(tmp_path / "docs")
    in_corpus_order = lambda chosen: [text for _, _, _, text in sorted(chosen, key=lambda c: (c[1], c[2]))]  # noqa
    expected = HashingEmbedder(384).embed(in_corpus_order(by_key[:10]))
    assert torch.equal(seen["tree"], expected)
    assert seen["tokenizer"] == in_corpus_order(by_key[:7])
    manifest = PreparedData.open(tmp_path / "prepared").manifest
    assert manifest["sample"] == {"tree": 10, "tokenizer": 7}
    assert manifest["documents"]["train"] == len(by_key)


def test_the_trees_sample_is_embedded_once(tmp_path: Path, monkeypatch) -> None:
    _corpus(tmp_path / "docs")
    embedded: list[str] = []
    real = HashingEmbedder.embed

    def counting(self, texts):
        embedded.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(HashingEmbedder, "embed", counting)
    prepare(_cfg(tmp_path, "prepared", "tree.fit_sample=10"), progress=False)
    texts = [json.loads(line)["text"] for f in range(4) for line in (tmp_path / "docs" / f"f{f}.jsonl").open()]
    assert sorted(embedded) == sorted(texts)  # every document once: stage 2 reuses stage 1's vectors
    data = PreparedData.open(tmp_path / "prepared")
    monkeypatch.setattr(HashingEmbedder, "embed", real)
    direct = data.tree.route(HashingEmbedder(384).embed(texts)).tolist()  # each document's own vector
    assert data.documents().column("path").to_pylist() == direct


def _gz_cut(path: Path) -> None:
    import gzip

    data = gzip.compress("".join(json.dumps({"id": f"g{i}", "text": f"text {i} " * 30}) + "\n"
                                 for i in range(200)).encode())
    path.write_bytes(data[: len(data) // 2])


def _garbled_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"q{i}" for i in range(50)], "text": [f"t {i}" for i in range(50)]}), path)
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36
    path.write_bytes(bytes(data))


BAD_FILES = {  # file name, how to write it, what the error must say
    "empty file": ("f9.jsonl", lambda p: p.write_bytes(b""), r"f9.jsonl: file has no records \(the file is empty\)"),
    "invalid JSON": ("f9.jsonl", lambda p: p.write_text('{"id": "a", "text": "x"}\n{"id": "b", text}\n'),
                     r"f9.jsonl: line 2 \(record 1\) is not valid JSON"),
    "missing text": ("f9.jsonl", lambda p: p.write_text('{"id": "a", "body": "x"}\n'),
                     r"f9.jsonl: record 0 has no text field 'text'"),
    "non-string text": ("f9.jsonl", lambda p: p.write_text('{"id": "a", "text": ["x"]}\n'),
                        r"f9.jsonl: record 0: field 'text' must be a non-empty string"),
    "invalid UTF-8": ("f9.jsonl", lambda p: p.write_bytes(b'{"id": "a", "text": "ok"}\n{"text": "caf\xe9"}\n'),
                      r"f9.jsonl: line 2 is not valid UTF-8"),
    "truncated gzip": ("f9.jsonl.gz", _gz_cut, r"f9.jsonl.gz: cannot read past line \d+: truncated or corrupt"),
    "corrupt parquet": ("f9.parquet", _garbled_parquet, r"f9.parquet: cannot read records from 0 on: corrupt parquet"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_names_the_file_and_record_and_leaves_nothing(tmp_path: Path, clean, case: str) -> None:
    name, write, message = BAD_FILES[case]
    write(tmp_path / "docs" / name)
    with pytest.raises(ValueError, match=message):
        prepare(_cfg(tmp_path, "clean"), overwrite=True, progress=False)
    assert _snapshot(tmp_path / "clean") == clean  # the earlier prepared directory is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "docs"]  # no work, no half-written directory


def test_the_paper_vocabulary_trains_on_a_small_sample(tmp_path: Path) -> None:
    assert load_config("paper-160m").data.tokenizer_vocab == 50_432
    _corpus(tmp_path / "docs")
    prepare(_cfg(tmp_path, "prepared", "data.tokenizer=bpe", "data.tokenizer_vocab=50432", "data.tokenizer_sample=20"),
            progress=False)
    data = PreparedData.open(tmp_path / "prepared")
    tok = data.tokenizer
    assert 258 < tok.vocab_size <= 50_432 and data.manifest["sample"]["tokenizer"] == 20  # no more merges exist
    text = json.loads((tmp_path / "docs" / "f3.jsonl").read_text().splitlines()[0])["text"]
    assert tok.decode(tok.encode(text)) == text
