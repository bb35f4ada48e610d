"""`hmtrain config keys` / `config show`, and overrides that name a key wrongly."""
import pytest

from hmtrain.cli import main
from hmtrain.config import ConfigError, flatten, load_config
from hmtrain.config.keys import config_keys


def test_every_key_of_the_schema_is_listed_with_its_help_and_default():
    keys = {k.name: k for k in config_keys()}
    flat = flatten(load_config(None))
    # an optional section (train.cotrain_optim: null) is listed by its keys, as overrides name them
    assert set(flat) - {"train.cotrain_optim"} <= set(keys)
    assert all(k.help for k in keys.values()), [k.name for k in keys.values() if not k.help]
    for name, value in flat.items():
        if name in keys:
            assert keys[name].default == value, name
    assert keys["parallel.placement"].choices == ("gather", "owner")
    assert keys["train.global_batch_size"].type == "int"


def test_config_show_prints_the_merged_config(capsys):
    assert main(["config", "show", "--config", "tiny", "train.seed=3"]) == 0
    shown = capsys.readouterr().out
    assert "  seed: 3\n" in shown and "global_batch_size:" in shown


def test_config_keys_lists_every_key_of_a_prefix(capsys):
    assert main(["config", "keys", "parallel."]) == 0
    out = capsys.readouterr().out
    for key in (k.name for k in config_keys() if k.name.startswith("parallel.")):
        assert key in out, key
    assert main(["config", "keys", "nosuch"]) == 2


@pytest.mark.parametrize("override, words", [
    ("train.globl_batch_size=8", "did you mean 'train.global_batch_size'"),
    ("train.zzzz=8", "hmtrain config keys lists them"),
    ("tree.branching=8,8", "config key 'tree.branching': expected a list in brackets, e.g. [8,8], got '8,8'"),
    ("batch_size", "e.g. train.global_batch_size=8"),
])
def test_a_mistyped_override_is_answered_in_hmtrains_words(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert words in str(info.value)
