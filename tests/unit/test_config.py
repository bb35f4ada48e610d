"""Config loading: presets, overrides, and errors that name the key."""
import re
from pathlib import Path

import pytest
import yaml

from hmtrain.checkpoint.resume import config_changes
from hmtrain.config import (
    ConfigError,
    Mode,
    ModelPart,
    Placement,
    check_branching,
    flatten,
    load_config,
    split_global_batch,
    to_yaml,
)
from hmtrain.config.load import CONFIG_DIR


def test_presets_load_and_validate():
    for preset in sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")):
        # posthoc-tiny names no model: any HF directory with a config.json will do (Table 2's hand-written one)
        cfg = load_config(preset, ["model.hf_path=configs/hf/qwen2.5-0.5b"] if preset == "posthoc-tiny" else [])
        assert len(cfg.memory.units) == len(cfg.tree.branching), preset


def test_override_changes_value_and_type():
    cfg = load_config("tiny", ["train.global_batch_size=3", "train.micro_batch_size=3", "tree.branching=[4,4]",
                               "logging.tracking_uri=file:/x"])
    assert cfg.train.global_batch_size == 3
    assert cfg.tree.branching == [4, 4]
    assert cfg.logging.tracking_uri == "file:/x"


def test_yaml_file_path_and_round_trip(tmp_path):
    cfg = load_config("tiny", ["train.pretrain_steps=7"])
    path = tmp_path / "run.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(str(path))
    assert flatten(again) == flatten(cfg)


@pytest.mark.parametrize("override, key", [
    ("train.bogus=1", "train.bogus"),
    ("model.d_modle=64", "model.d_modle"),
    ("train.global_batch_size=abc", "train.global_batch_size"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("memory.units=[1,2,3]", "memory.units"),
    ("tree.branching=[1,8]", "tree.branching"),
    ("train.anchor=melted", "train.anchor"),
    ("train.anchor_optim.schedule=linear", "train.anchor_optim.schedule"),
    ("model.head_dim=33", "model.head_dim"),
    ("train.anchor_optim.lr=inf", "train.anchor_optim.lr"),
    ("train.memory_optim.betas=[0.9,nan]", "train.memory_optim.betas[1]"),
    ("memory.init_std=-inf", "memory.init_std"),
    ("tree.balance=nan", "tree.balance"),
    ("train.seed=-1", "train.seed"),
    ("data.seed=-1", "data.seed"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.run_dir=' '", "train.run_dir"),
    ("memory.units=[0,0]", "memory.units"),
    ("eval.max_sequences=-1", "eval.max_sequences"),
    ("eval.max_probes=-1", "eval.max_probes"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("tiny", [override])


def test_units_may_all_be_zero_where_no_memory_trains():
    for extra in ("train.mode=dense", "train.memory_steps=0"):
        assert load_config("tiny", ["memory.units=[0,0]", extra]).memory.units == [0, 0]


def test_unknown_key_in_yaml_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  global_batch_sise: 4\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(str(path))


def test_missing_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-preset")


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["train.global_batch_size"])


WRITTEN_BEFORE_CHOICES = Path(__file__).parent / "data" / "config_written_before_choices.yaml"
SAME_RUN = ["memory_model.stages=[{name: ae, steps: 3, objective: autoencode}, {name: blank, steps: 3, objective: "
            "blank_copy, freeze: [encoder_blocks], reinit: [encoder_embedding]}]", "train.mode=dense",
            "parallel.placement=owner", "memory.dtype=bf16"]


def test_a_config_yaml_written_with_plain_strings_still_loads_and_resumes_unchanged():
    """config.yaml as the code before choice Enums wrote it (run directories, checkpoints): it loads,
    its choices become members, and the resume diff sees no change against the same run's config."""
    saved = load_config(str(WRITTEN_BEFORE_CHOICES))
    assert saved.train.mode is Mode.dense and saved.parallel.placement is Placement.owner
    assert saved.memory_model.stages[1].freeze == [ModelPart.encoder_blocks]
    assert config_changes(saved, load_config("memory-tiny", SAME_RUN)) == {}
    # written back with plain strings, value for value (keys added since then come on top)
    assert_within(yaml.safe_load(WRITTEN_BEFORE_CHOICES.read_text()), yaml.safe_load(to_yaml(saved)))


def assert_within(old, new, where="config"):
    if isinstance(old, dict):
        for key, value in old.items():
            assert key in new, f"{where}.{key} is gone"
            assert_within(value, new[key], f"{where}.{key}")
    else:
        assert old == new, f"{where}: {old!r} became {new!r}"


def test_flatten_and_yaml_write_plain_names():
    cfg = load_config("memory-tiny", SAME_RUN)
    flat = flatten(cfg)
    assert type(flat["train.mode"]) is str and flat["train.mode"] == "dense"
    assert type(flat["memory_model.stages"][1]["freeze"][0]) is str
    assert str(flat["memory_model.stages"][1]["objective"]) == "blank_copy"
    assert "mode: dense\n" in to_yaml(cfg) and "Mode" not in to_yaml(cfg)


@pytest.mark.parametrize("override, line", [
    ("train.mode=sparse", "config key 'train.mode': must be hierarchical or dense, got 'sparse'"),
    ("parallel.engine=megatrn", "config key 'parallel.engine': must be fsdp or deepspeed, got 'megatrn'"),
    ("memory_model.stages=[{objective: clm}, {freeze: [wings]}]",
     "config key 'memory_model.stages[1].freeze[0]': must be encoder_embedding, encoder_blocks, encoder, "
     "decoder or autoencoder_decoder, got 'wings'"),
])
def test_a_bad_choice_is_one_line_naming_the_key_and_the_allowed_values(override, line):
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [override])
    assert str(caught.value) == line


def test_the_megatron_engine_is_refused_saying_why_and_what_to_use_instead():
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", ["parallel.engine=megatron"])
    line = str(caught.value)
    assert "\n" not in line and line.startswith("config key 'parallel.engine': 'megatron': megatron-core's GPTModel")
    assert "GPU check" in line and "parallel.tensor_parallel=N" in line


def test_choices_compare_with_their_names():
    cfg = load_config("tiny", ["train.anchor=cotrain"])
    assert cfg.train.anchor == "cotrain" and f"{cfg.train.anchor}" == "cotrain" and cfg.train.anchor in ("cotrain",)
    assert {"cotrain": 1}[cfg.train.anchor] == 1
    assert f"{cfg.train.anchor!r}" == "'cotrain'"  # messages that show a value with !r read as before


def test_one_rule_splits_a_global_batch_over_ranks_and_micro_batches():
    assert split_global_batch(12, 2, micro_batch_size=2) == (3, 2)
    assert split_global_batch(12, 2, micro_batches=3) == (3, 2)
    with pytest.raises(ConfigError, match=r"^config key 'train.global_batch_size': a global batch of 10 sequences does "
                                          r"not split into micro-batches of 2 per rank on 3 ranks \(need a positive "
                                          r"multiple of 6\)$"):
        split_global_batch(10, 3, micro_batch_size=2)
    with pytest.raises(ConfigError, match="^--global-batch: needs at least one rank"):
        split_global_batch(4, 0, micro_batches=2, name="--global-batch")
    with pytest.raises(ConfigError, match="train.pretrain_global_batch_size.*micro-batches of 4"):
        load_config("tiny", ["train.micro_batch_size=4", "train.global_batch_size=8",
                             "train.pretrain_global_batch_size=6"])


def test_one_branching_rule_for_the_config():
    with pytest.raises(ConfigError, match=r"^config key 'tree.branching': branching\[1\] must be >= 2, got 1$"):
        load_config("tiny", ["tree.branching=[4,1]"])
    assert check_branching([2, 3]) == (2, 3)
