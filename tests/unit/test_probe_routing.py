"""The oracle path's rule (hmtrain/data/routing/oracle.py) and `eval.probe_routing`'s values."""
import pytest

from hmtrain.config import ConfigError, load_config
from hmtrain.data.routing.oracle import majority_path, oracle_path


def test_majority_path_is_the_most_common_full_path_and_a_tie_goes_to_the_first_seen():
    assert majority_path([[1, 4], [0, 1], [1, 4]]) == [1, 4]
    # per level the majorities would be 0 then 3, not a tree path; the full path (1, 3) is the most common
    assert majority_path([[0, 0], [0, 1], [0, 2], [1, 3], [1, 3]]) == [1, 3]
    assert majority_path([[0, 2], [1, 3], [1, 3], [0, 2]]) == [0, 2]
    with pytest.raises(ValueError, match="at least one path"):
        majority_path([])


def test_oracle_path_reads_training_documents_and_falls_back_to_all():
    documents = {"a": ("train", [0, 1]), "b": ("heldout", [1, 3]), "c": ("heldout", [1, 3]), "d": ("train", [0, 1])}
    assert oracle_path({"doc_ids": ["b", "a", "c"]}, documents) == [0, 1]  # held-out documents do not vote
    assert oracle_path({"doc_ids": ["b", "c"]}, documents) == [1, 3]  # no training document: all of them
    assert oracle_path({"doc_ids": ["x"]}, documents) is None
    assert oracle_path({}, documents) is None


def test_an_unknown_probe_routing_is_a_config_error_naming_the_key_and_the_values():
    with pytest.raises(ConfigError, match=r"eval.probe_routing.*question, context or oracle.*'nearest'"):
        load_config("tiny", ["eval.probe_routing=nearest"])
    assert load_config("tiny", ["eval.probe_routing=oracle"]).eval.probe_routing == "oracle"
