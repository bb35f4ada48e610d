"""Reading probe files: errors name the file and the probe; limits sample, not truncate."""
import json

import pytest

from hmtrain.data.corpus.probes import balanced_probes, bucket_counts, load_probes


def probe(i, **extra):
    return {"question": f"q{i}?", "prompt": f"p{i}", "answer": " a", "choices": [" a", " b"], "bucket": "1",
            **extra}


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_and_samples(tmp_path):
    path = write(tmp_path / "p.jsonl", [json.dumps(probe(i)) for i in range(10)])
    assert [p["prompt"] for p in load_probes(path)] == [f"p{i}" for i in range(10)]
    sampled = load_probes(path, limit=4)
    assert len(sampled) == 4 and all(p in load_probes(path) for p in sampled)
    assert sampled == load_probes(path, limit=4)  # seeded


@pytest.mark.parametrize("line, match", [
    ("{not json", r"p\.jsonl: line 2 .*not valid JSON"),
    (json.dumps({"question": "q"}), r"p\.jsonl: line 2 \(probe 1\) lacks"),
    (json.dumps(probe(1, answer=" z")), r"p\.jsonl: line 2 \(probe 1\): answer ' z' is not among its choices"),
    (json.dumps(probe(1, choices=[" a", ""])), r"line 2 \(probe 1\): choice 1 is empty"),
    (json.dumps(probe(1, prompt="")), r"line 2 \(probe 1\): prompt is empty"),
    (json.dumps(probe(1, choices=[" a"])), r"line 2 \(probe 1\): choices holds 1; .* at least 2"),
    (json.dumps(probe(1, choices=[" a", " b", " a"])), r"line 2 \(probe 1\): choice ' a' appears more than once"),
])
def test_bad_probes_are_named(tmp_path, line, match):
    path = write(tmp_path / "p.jsonl", [json.dumps(probe(0)), line])
    with pytest.raises(ValueError, match=match):
        load_probes(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="hmtrain data synth"):
        load_probes(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="no probes"):
        load_probes(write(tmp_path / "p.jsonl", []))


def test_balanced_subset_takes_turns_over_buckets():
    probes = [probe(i, bucket=b) for i, b in enumerate(["16+"] * 10 + ["1"] + ["2-3"] * 5)]
    subset = balanced_probes(probes, 7)
    assert bucket_counts(subset) == {"1": 1, "2-3": 3, "16+": 3}  # "1" has one: its turns go to the others
    assert subset == balanced_probes(probes, 7)  # seeded
    assert [p["prompt"] for p in subset] == sorted((p["prompt"] for p in subset), key=lambda s: int(s[1:]))
    assert balanced_probes(probes, 16) == probes
