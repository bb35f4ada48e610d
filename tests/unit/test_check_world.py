"""check_world: what the world size decides, before a run builds or writes anything."""
import logging
from types import SimpleNamespace

import pytest

from hmtrain.config import load_config
from hmtrain.train.build import check_world

DATA = SimpleNamespace(manifest={"node_tokens": [[100, 120, 90]]})  # three level-1 subtrees


def config(*overrides):
    return load_config("tiny", ["train.global_batch_size=12", "train.micro_batch_size=2", *overrides])


def test_a_batch_that_splits_passes_and_owner_placement_runs_on_any_world_size():
    check_world(config("parallel.placement=owner"), 3, DATA)
    check_world(config(), 6, DATA)
    # more ranks than level-1 subtrees: owner placement's groups hold several ranks (6 ranks: 3 groups of 2)
    check_world(config("parallel.placement=owner"), 6, DATA)


@pytest.mark.parametrize("world, overrides, words", [
    (4, [], "config key 'train.global_batch_size': a global batch of 12 sequences does not split"),
    (2, ["train.pretrain_global_batch_size=6"], "config key 'train.pretrain_global_batch_size'"),
])
def test_what_does_not_fit_the_world_size_is_named(world, overrides, words):
    with pytest.raises(ValueError, match=words):
        check_world(config(*overrides), world, DATA)


def test_settings_one_process_ignores_are_said_to_be_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        check_world(config("parallel.engine=deepspeed"), 1, DATA)
    assert "parallel.engine=deepspeed: ignored on one process" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_world(config("parallel.engine=deepspeed"), 2, DATA)
    assert "ignored" not in caplog.text
