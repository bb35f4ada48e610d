import gzip
import json
from collections import Counter

import pytest

from hmtrain.data.corpus.documents import read_documents
from hmtrain.data.corpus.synth import BUCKETS, PROBED, TEMPLATES, frequency_bucket, synthesize

FILES = ["documents.jsonl.gz", "probes.jsonl", "people.json", "synth.json"]


def load(out):
    docs = [json.loads(line) for line in gzip.open(out / "documents.jsonl.gz", "rt", encoding="utf-8")]
    probes = [json.loads(line) for line in open(out / "probes.jsonl", encoding="utf-8")]
    people = json.loads((out / "people.json").read_text())
    return docs, probes, people


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(out, num_people=200, num_documents=1500, seed=3)
    return out, summary, *load(out)


def test_frequency_bucket():
    assert BUCKETS == ["1", "2-3", "4-7", "8-15", "16+"]
    expect = {1: "1", 2: "2-3", 3: "2-3", 4: "4-7", 7: "4-7", 8: "8-15", 15: "8-15", 16: "16+", 1000: "16+"}
    assert {n: frequency_bucket(n) for n in expect} == expect
    with pytest.raises(ValueError, match="frequency"):
        frequency_bucket(0)


def test_deterministic_bytes(tmp_path):
    a = synthesize(tmp_path / "a", num_people=60, num_documents=300, seed=7)
    b = synthesize(tmp_path / "b", num_people=60, num_documents=300, seed=7)
    c = synthesize(tmp_path / "c", num_people=60, num_documents=300, seed=8)
    assert a == b
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "documents.jsonl.gz").read_bytes() != (tmp_path / "c" / "documents.jsonl.gz").read_bytes()
    assert c["params"]["seed"] == 8


def test_counts_and_zipf_shape(corpus):
    out, summary, docs, probes, people = corpus
    assert len(docs) == summary["num_documents"] == 1500
    assert len(people) == 200
    counts = [p["frequency"] for p in people]
    assert sum(counts) == 1500 and min(counts) >= 1
    assert counts == sorted(counts, reverse=True)  # person index = frequency rank
    assert counts[0] >= 100  # a heavy head ...
    per_bucket = summary["people_per_bucket"]
    assert list(per_bucket) == BUCKETS
    assert per_bucket["1"] + per_bucket["2-3"] > len(people) / 2  # ... and most people are rare
    assert per_bucket["1"] > per_bucket["16+"]
    assert sum(summary["documents_per_bucket"].values()) == 1500
    # Zipf: the rank-1 to rank-10 ratio is close to 10^1.1.
    assert 8 < counts[0] / counts[9] < 18
    assert Counter(d["person"] for d in docs) == {p["person"]: p["frequency"] for p in people}


def test_min_docs_per_person(tmp_path):
    s = synthesize(tmp_path, num_people=50, num_documents=400, min_docs_per_person=4)
    people = json.loads((tmp_path / "people.json").read_text())
    assert min(p["frequency"] for p in people) == 4
    assert s["people_per_bucket"]["1"] == 0 and s["people_per_bucket"]["2-3"] == 0
    assert sum(p["frequency"] for p in people) == 400


def test_documents_readable_and_unique(corpus):
    out, _, docs, _, people = corpus
    read = list(read_documents(out / "documents.jsonl.gz"))
    assert [d.id for d in read] == [d["id"] for d in docs]
    assert len({d["text"] for d in docs}) > 0.95 * len(docs)  # filler/templates make docs differ
    names = {p["person"]: p["name"] for p in people}
    assert len(set(names.values())) == len(names)
    for d in docs:
        assert d["text"].count(names[d["person"]]) >= 1
        others = [n for pid, n in names.items() if pid != d["person"] and n in d["text"]]
        assert not others, (d["id"], others)  # each document is about exactly one person


def test_probes(corpus):
    _, summary, docs, probes, people = corpus
    by_id = {d["id"]: d for d in docs}
    doc_ids_of = {p["person"]: sorted(d["id"] for d in docs if d["person"] == p["person"]) for p in people}
    assert len(probes) == summary["num_probes"] == len({p["id"] for p in probes})
    assert {p["attribute"] for p in probes} == set(PROBED)
    for pr in probes:
        person = people[pr["person"]]
        value = person["attributes"][pr["attribute"]]
        if pr["attribute"] == "occupation":
            value = ("an " if value[0] in "aeiou" else "a ") + value
        assert pr["answer"] == " " + value
        assert pr["answer"].startswith(" ") and pr["answer"] in pr["choices"]
        assert len(pr["choices"]) == len(set(pr["choices"])) == 8
        assert pr["frequency"] == person["frequency"] and pr["bucket"] == frequency_bucket(pr["frequency"])
        assert sorted(pr["doc_ids"]) == doc_ids_of[pr["person"]]
        assert pr["prompt"].startswith(person["name"]) and person["name"] in pr["question"]
        texts = [by_id[i]["text"] for i in pr["doc_ids"]]
        assert all(by_id[i]["person"] == pr["person"] for i in pr["doc_ids"])
        assert any(pr["answer"].strip() in t for t in texts)
        # The cloze prompt + answer is stated verbatim, as the start of a sentence.
        statement = pr["prompt"] + pr["answer"]
        assert any(t.startswith(statement) or ". " + statement in t for t in texts), pr["id"]
    # Choices are shuffled: the answer is not always in the same slot.
    assert len({pr["choices"].index(pr["answer"]) for pr in probes}) == 8


def test_probe_prompts_are_unambiguous():
    # No other attribute's canonical sentence may begin with a probe's prompt.
    from hmtrain.data.corpus.synth import PROMPTS

    for attr, prompt in PROMPTS.items():
        stem = prompt.format(name="X")
        for other, templates in TEMPLATES.items():
            if other != attr:
                for t in templates:
                    assert not t.format(s="X", sp="X's", name="X", first="X", p="her", v="V").startswith(stem)


def test_questions_and_occupation_articles(corpus):
    _, _, _, probes, _ = corpus
    occ = [p for p in probes if p["attribute"] == "occupation"]
    assert occ and all(c.startswith((" a ", " an ")) for p in occ for c in p["choices"])
    assert all(p["question"].endswith("?") for p in probes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_people": 0}, "--people"),
        ({"num_people": 100, "num_documents": 50}, "--documents must be at least --people"),
        ({"min_docs_per_person": 0}, "min_docs_per_person"),
        ({"num_choices": 1}, "--choices"),
        ({"num_choices": 99}, "--choices"),
        ({"zipf_exponent": -1.0}, "--zipf"),
        ({"zipf_exponent": float("nan")}, "--zipf must be a finite number"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path, **kwargs)


def test_output_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(ValueError, match="blocker is a file, not a directory"):
        synthesize(tmp_path / "blocker" / "corpus", num_people=5, num_documents=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_a_failed_rewrite_keeps_the_earlier_files(tmp_path, monkeypatch):
    synthesize(tmp_path, num_people=5, num_documents=10, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import hmtrain.data.corpus.synth as synth

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth.json, "dumps", full_disk)  # fails inside the first file, after it is opened
    with pytest.raises(OSError, match="No space"):
        synthesize(tmp_path, num_people=5, num_documents=10, seed=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no half-written file, no .tmp


def test_an_existing_corpus_is_kept_unless_overwrite(tmp_path):
    synthesize(tmp_path, num_people=5, num_documents=10, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a corpus.*--overwrite"):
        synthesize(tmp_path, num_people=6, num_documents=12, seed=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    synthesize(tmp_path, num_people=6, num_documents=12, seed=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} != before
