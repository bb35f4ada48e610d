"""Config loading: presets, overrides, and errors that name the key."""
import pytest

from hmtrain.config import ConfigError, flatten, load_config, to_yaml
from hmtrain.config.load import CONFIG_DIR


def test_presets_load_and_validate():
    for preset in sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(preset)
        assert len(cfg.memory.units) == len(cfg.tree.branching), preset


def test_override_changes_value_and_type():
    cfg = load_config("tiny", ["train.global_batch_size=3", "train.micro_batch_size=3", "tree.branching=[4,4]", "logging.tracking_uri=file:/x"])
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
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", [override])


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
