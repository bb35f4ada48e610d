"""Eval inputs checked up front: probe shapes, bucket order, the --out path."""
import json

import pytest

from hmtrain.data.corpus.probes import bucket_counts, bucket_order, load_probes
from hmtrain.eval.evaluate import check_output_path


def probe(**overrides) -> dict:
    base = {"question": "Where was Ada born?", "prompt": "Ada was born in", "answer": " Paris",
            "choices": [" Paris", " Rome"], "bucket": "1"}
    return {**base, **overrides}


def write_probes(path, *probes):
    path.write_text("".join(json.dumps(p) + "\n" for p in probes))
    return path


@pytest.mark.parametrize("choices", [" Paris Rome", [" Paris", 3], [], {" Paris": 1}])
def test_choices_must_be_a_list_of_strings(tmp_path, choices):
    path = write_probes(tmp_path / "probes.jsonl", probe(), probe(choices=choices))
    with pytest.raises(ValueError) as exc_info:
        load_probes(path)
    assert str(path) in str(exc_info.value) and "probe 1" in str(exc_info.value) and "choices" in str(exc_info.value)


def test_buckets_are_ordered_by_lower_bound_with_all_last():
    assert bucket_order(["10-99", "all", "1-2", "100+", "3-9"]) == ["1-2", "3-9", "10-99", "100+", "all"]
    assert bucket_order(["16+", "1", "rare", "2-3", "all", "8-15", "4-7"]) == ["1", "2-3", "4-7", "8-15", "16+",
                                                                             "rare", "all"]
    probes = [probe(bucket=b) for b in ("10-99", "1-2", "10-99", "100+", "3-9")]
    assert list(bucket_counts(probes).items()) == [("1-2", 1), ("3-9", 1), ("10-99", 2), ("100+", 1)]


def test_out_path_is_checked_before_evaluating(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_path(tmp_path / "file" / "results.json")
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path)
    check_output_path(tmp_path / "new" / "dir" / "results.json")  # parents get created on write
