"""Data and tree config keys are checked at load time, naming the key, before any document is read."""

import pytest

from hmtrain.config import ConfigError, load_config


@pytest.mark.parametrize("override,key", [
    ("data.embed_batch_size=0", "data.embed_batch_size"),
    ("tree.em_steps=-1", "tree.em_steps"),
    ("tree.subsample=0", "tree.subsample"),
    ("tree.fit_sample=-5", "tree.fit_sample"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.text_field=", "data.text_field"),
    ("data.prepared=", "data.prepared"),
    ("data.tokenizer_vocab=100", "data.tokenizer_vocab"),
])
def test_bad_data_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config("tiny", [override])


def test_new_data_keys_have_safe_defaults():
    cfg = load_config("tiny", ["data.num_workers=2", "data.verify_checksums=true", "tree.em_steps=0",
                               "data.tokenizer=byte", "data.tokenizer_vocab=100"])
    assert cfg.data.num_workers == 2 and cfg.data.verify_checksums is True and cfg.tree.em_steps == 0
    assert load_config("tiny").data.num_workers == 0 and load_config("tiny").data.verify_checksums is False
