"""check_world: what the world size decides, before a run builds or writes anything."""
import logging
from types import SimpleNamespace

import pytest

from hmtrain.config import load_config
from hmtrain.config.checks import ConfigError
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


ANCHOR_ONLY = ["train.memory_steps=0"]  # the pretrain phase alone


def test_a_tensor_parallel_degree_that_fits_passes_and_splits_the_batch_over_data_parallel_ranks():
    check_world(config("parallel.tensor_parallel=2", *ANCHOR_ONLY), 4, DATA)
    # 12 sequences over 2 data-parallel ranks of 2 tensor-parallel ranks each, not over 4 ranks
    check_world(config("parallel.tensor_parallel=2", "train.global_batch_size=4", *ANCHOR_ONLY), 4, DATA)
    with pytest.raises(ValueError, match="'train.global_batch_size': a global batch of 6 sequences does not split"):
        check_world(config("parallel.tensor_parallel=2", "train.global_batch_size=6", *ANCHOR_ONLY), 8, DATA)


@pytest.mark.parametrize("world, overrides, words", [
    (3, ["parallel.tensor_parallel=2", *ANCHOR_ONLY], "world size 3 is not divisible by 2"),
    (3, ["parallel.tensor_parallel=3", *ANCHOR_ONLY], "model.n_heads=4 is not divisible by 3"),
    (2, ["parallel.tensor_parallel=2", "model.ffn_hidden=385", *ANCHOR_ONLY], "385 hidden units are not divisible"),
    (2, ["parallel.tensor_parallel=2", "memory.units=[64,31]", *ANCHOR_ONLY], r"memory.units \[64, 31\]: \[31\]"),
    (2, ["parallel.tensor_parallel=2", "parallel.engine=deepspeed", *ANCHOR_ONLY], "parallel.engine=fsdp"),
    (2, ["parallel.tensor_parallel=2", "model.vocab_multiple=3", *ANCHOR_ONLY], "model.vocab_multiple=3 .the "
     "vocabulary is padded to a multiple of it. is not divisible by 2"),
    (2, ["parallel.tensor_parallel=2", "model.vocab_size=2049", *ANCHOR_ONLY], "the vocabulary of 2049 rows"),
])
def test_a_bad_tensor_parallel_degree_is_one_line_naming_the_key(world, overrides, words):
    with pytest.raises(ConfigError, match=words) as error:
        check_world(config(*overrides), world, DATA)
    assert str(error.value).startswith("config key 'parallel.tensor_parallel': ") and "\n" not in str(error.value)


def test_the_ffn_memory_splits_over_tensor_parallel_ranks_and_other_kinds_are_named():
    check_world(config("parallel.tensor_parallel=2"), 2, DATA)  # both phases, memory.kind=ffn, gather placement
    # owner placement's groups of data-parallel ranks: 4 of them, more than the 3 level-1 subtrees, 2 per group
    check_world(config("parallel.tensor_parallel=2", "parallel.placement=owner", "train.global_batch_size=16"), 8, DATA)
    with pytest.raises(ConfigError, match="memory.kind=lora_ffn is not split") as error:
        check_world(config("parallel.tensor_parallel=2", "memory.kind=lora_ffn"), 2, DATA)
    assert str(error.value).startswith("config key 'memory.kind': ") and "\n" not in str(error.value)
    check_world(config("parallel.tensor_parallel=2", "memory.kind=lora_ffn", *ANCHOR_ONLY), 2, DATA)  # no memory


def test_tensor_parallel_must_be_positive():
    with pytest.raises(ConfigError, match="'parallel.tensor_parallel': must be positive, got 0"):
        config("parallel.tensor_parallel=0")


def test_tensor_parallel_checks_the_dense_baseline_it_would_train():
    data = SimpleNamespace(manifest={**DATA.manifest, "vocab_size": 300})  # the dense width depends on the vocabulary
    check_world(config("parallel.tensor_parallel=2", "train.mode=dense"), 2, data)  # 6 heads, 544 FFN units
    check_world(config("parallel.tensor_parallel=2", "train.mode=dense", "memory.units=[64,31]"), 2, data)  # unused
    small = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_dim=16", "model.ffn_hidden=64"]
    with pytest.raises(ConfigError, match=r"model.n_heads=3 of the dense baseline \(sized from the anchor"):
        check_world(config("parallel.tensor_parallel=2", "train.mode=dense", *small), 2, data)
