"""What --resume accepts: the config allowlist, the global batch, the data fingerprints, --fallback."""
import logging

import pytest
import torch

from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.checkpoint.resume import (
    check_config_change,
    check_data_fingerprints,
    global_batch,
    load_for_resume,
    may_change,
)
from hmtrain.checkpoint.verify import CheckpointError
from hmtrain.config import Config, ConfigError, to_yaml


def changed(**keys) -> Config:
    cfg = Config()
    for dotted, value in keys.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("keys, named", [
    ({"model__d_model": 48}, "model.d_model"),
    ({"memory__units": [8, 8, 8, 8]}, "memory.units"),
    ({"memory__layers": "late"}, "memory.layers: 'all' -> 'late'"),  # the bank's rows hold other layers
    ({"memory__layers": [0, 1]}, "memory.layers: 'all' -> [0, 1]"),
    ({"train__global_batch_size": 4}, "train.global_batch_size"),
    ({"train__clip_grad": 0.5, "train__memory_steps": 3000}, "train.clip_grad"),
    ({"data__seq_len": 128}, "data.seq_len"),
])
def test_changes_outside_the_allowlist_are_refused_by_name(keys, named):
    with pytest.raises(ConfigError) as exc_info:
        check_config_change("ckpt/step_00000010", Config(), changed(**keys), step=10)
    message = str(exc_info.value)
    assert named in message and "ckpt/step_00000010" in message and "\n" not in message
    assert "train.memory_steps" not in message  # allowed keys are not listed as refused


def test_allowed_changes_pass_and_are_logged(caplog):
    new = changed(train__memory_steps=3000, train__checkpoint_every=7, logging__experiment="x", eval__batch_size=2,
                  data__probes="p.jsonl", train__device="cpu", train__run_dir="elsewhere",
                  parallel__fetch="micro_batch", parallel__checkpoint_timeout_s=60, train__eval_probes=8)
    with caplog.at_level(logging.INFO, logger="hmtrain.checkpoint.resume"):
        check_config_change("ckpt", Config(), new, step=10)
    assert "train.memory_steps" in caplog.text


def test_micro_batch_may_change_when_the_global_batch_does_not(caplog):
    with caplog.at_level(logging.INFO, logger="hmtrain.checkpoint.resume"):
        check_config_change("ckpt", Config(), changed(train__micro_batch_size=4), step=10)
    assert "same global batch of 8" in caplog.text
    with pytest.raises(ConfigError, match="global batch must stay the same"):
        check_config_change("ckpt", Config(), changed(train__global_batch_size=16), step=10)


def test_global_batch_reads_the_schema_key():
    assert global_batch({"train.global_batch_size": 64, "train.micro_batch_size": 8}) == 64
    assert global_batch({}) is None
    assert may_change("train.micro_batch_size") is False  # handled by the global-batch rule, not the allowlist
    assert may_change("logging.tracking_uri") and may_change("parallel.placement") and not may_change("model.d_model")


def test_phase_switch_cannot_move_once_the_memory_phase_began():
    saved = changed(train__pretrain_steps=10)
    check_config_change("ckpt", saved, changed(train__pretrain_steps=20), step=5)  # still pretraining: fine
    with pytest.raises(ConfigError, match="train.pretrain_steps"):
        check_config_change("ckpt", saved, changed(train__pretrain_steps=20), step=12)


def test_other_prepared_data_is_refused_naming_both_fingerprints():
    record = {"data_fingerprints": {"tokenizer": "a" * 64, "tree": "b" * 64}}
    check_data_fingerprints("ckpt", record, {"tokenizer": "a" * 64, "tree": "b" * 64}, "prepared")
    with pytest.raises(ValueError) as exc_info:
        check_data_fingerprints("ckpt", record, {"tokenizer": "c" * 64, "tree": "b" * 64}, "prepared")
    message = str(exc_info.value)
    assert "tokenizer" in message and "a" * 12 in message and "c" * 12 in message and "prepared" in message


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}}


def test_fallback_resumes_from_the_newest_loadable_checkpoint(tmp_path, caplog):
    saver = Checkpointer(tmp_path, keep=5)
    for step in (2, 4, 6):
        saver.write(step, _state(step), {"loader": {}}, to_yaml(Config()))
    data = tmp_path / "step_00000006" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:40])
    state = _state(0.0)

    def fresh(path, record):
        return Checkpointer.load(path, state)

    with pytest.raises(CheckpointError) as exc_info:
        load_for_resume(saver, Config(), {}, tmp_path, fresh)
    message = str(exc_info.value)
    assert "step_00000006" in message and "step_00000004" in message and "--fallback" in message

    with caplog.at_level(logging.WARNING, logger="hmtrain.checkpoint.resume"):
        path, record = load_for_resume(saver, Config(), {}, tmp_path, fresh, fallback=True)
    assert path.name == "step_00000004" and record["step"] == 4
    assert torch.equal(state["model"]["w"], _state(4)["model"]["w"])
    assert "skipping" in caplog.text and "step_00000006" in caplog.text
    # the broken one is set aside, so pruning keeps the good ones and the next resume does not meet it again
    assert [p.name for p in saver.step_dirs()] == ["step_00000002", "step_00000004"]
    assert (tmp_path / "step_00000006.broken").is_dir()


def test_config_change_is_refused_even_with_fallback(tmp_path):
    saver = Checkpointer(tmp_path, keep=5)
    saver.write(2, _state(2), {"loader": {}}, to_yaml(Config()))
    with pytest.raises(ConfigError, match="model.d_model"):
        load_for_resume(saver, changed(model__d_model=48), {}, tmp_path, lambda path, record: {}, fallback=True)
