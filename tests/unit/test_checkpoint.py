"""Checkpoints: one-line errors for broken ones, a crash-safe prune, a disk full during save."""
import errno
import hashlib
import json
import shutil
import threading

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
from omegaconf import OmegaConf

from hmtrain.checkpoint import checkpointer as ckpt
from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.checkpoint.verify import CheckpointError, check_complete, read_config, read_trainer
from hmtrain.config import Config, to_yaml


def make_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"a": torch.randn(16, 8, generator=g), "b": torch.randn(32, generator=g)},
            "rng": {"torch": torch.randint(0, 255, (20,), generator=g, dtype=torch.uint8)}}


def save_steps(directory, steps, keep=10):
    saver = Checkpointer(directory, keep=keep)
    for step in steps:
        saver.write(step, make_state(step), {"loader": {"position": step}}, to_yaml(Config()))
    return saver


def assert_one_line_naming(exc_info, path, *words):
    message = str(exc_info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


def test_roundtrip(tmp_path):
    saver = save_steps(tmp_path, [1, 2])
    loaded = {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in make_state().items()}
    record = Checkpointer.load(saver.latest(), loaded)
    assert record["step"] == 2 and record["loader"] == {"position": 2}
    assert all(torch.equal(loaded["model"][k], make_state(2)["model"][k]) for k in ("a", "b"))


@pytest.mark.parametrize("damage", ["truncate data", "delete data", "truncate metadata", "garble data"])
def test_broken_checkpoint_is_one_line_naming_it(tmp_path, damage):
    path = save_steps(tmp_path, [1]).latest()
    data = path / "__0_0.distcp"
    if damage == "truncate data":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "delete data":
        data.unlink()
    elif damage == "truncate metadata":
        (path / ".metadata").write_bytes((path / ".metadata").read_bytes()[:50])
    else:  # same size, bytes garbled: only the load itself can tell
        raw = bytearray(data.read_bytes())
        raw[:200] = b"\x00" * 200
        data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as exc_info:  # DCP's own CheckpointException is a BaseException
        Checkpointer.load(path, make_state())
    assert_one_line_naming(exc_info, path)


def test_truncated_trainer_json_and_config_are_refused(tmp_path):
    path = save_steps(tmp_path, [1]).latest()
    good_config = (path / "config.yaml").read_text()
    (path / "trainer.json").write_text((path / "trainer.json").read_text()[:15])
    with pytest.raises(CheckpointError) as exc_info:
        read_trainer(path)
    assert_one_line_naming(exc_info, path, "trainer.json")

    path = save_steps(tmp_path / "b", [1]).latest()
    record = read_trainer(path)
    lines = good_config.splitlines(keepends=True)
    # cut at a line boundary, before the last keys: valid YAML and a valid config once schema defaults fill
    # the gap, which is what happened before; only strict loading notices
    assert lines[-1].startswith("  ") and lines[-2].startswith("  ")  # the last two are keys of the last section
    (path / "config.yaml").write_text("".join(lines[:-2]))
    for recorded in (record, {}):  # with and without the hash recorded in trainer.json
        with pytest.raises(CheckpointError) as exc_info:
            read_config(path, recorded)
        assert_one_line_naming(exc_info, path, "config.yaml")
    (path / "config.yaml").write_text(good_config)
    assert read_config(path, record) == Config()


def test_a_config_saved_by_an_older_version_loads_with_defaults(tmp_path, caplog):
    """Settings added after a checkpoint was written take their defaults, when the recorded hash shows the
    file is whole; without a hash, the same missing keys read as a truncated file."""
    path = save_steps(tmp_path, [1]).latest()
    older = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    del older["logging"]["system_metrics_interval_s"]
    (path / "config.yaml").write_text(OmegaConf.to_yaml(older))
    record = read_trainer(path)
    record["config_sha256"] = hashlib.sha256((path / "config.yaml").read_bytes()).hexdigest()
    with caplog.at_level("WARNING"):
        assert read_config(path, record) == Config()
    assert "logging.system_metrics_interval_s" in caplog.text and "older hmtrain" in caplog.text
    with pytest.raises(CheckpointError) as exc_info:
        read_config(path, {})
    assert_one_line_naming(exc_info, path, "config.yaml")


def test_killed_prune_never_leaves_a_complete_looking_broken_checkpoint(tmp_path, monkeypatch):
    saver = save_steps(tmp_path, [1, 2], keep=2)
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):
        # the process dies after removing the data file but before the completeness marker
        for name in ("__0_0.distcp", ".metadata"):
            if (path / name).exists():
                (path / name).unlink()
        raise KeyboardInterrupt("killed mid-prune")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    saver.write(3, make_state(3), {"loader": {}}, to_yaml(Config()))  # the removal runs on its own thread
    saver.close()  # ... where it was killed
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for path in saver.step_dirs():  # step 1 was being deleted: it must not be listed
        check_complete(path)
    assert [p.name for p in saver.step_dirs()] == ["step_00000002", "step_00000003"]
    assert saver.latest().name == "step_00000003"
    saver.write(4, make_state(4), {"loader": {}}, to_yaml(Config()))  # the next prune sweeps the leftover
    saver.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_old_checkpoints_are_removed_off_the_saving_thread(tmp_path, monkeypatch):
    """A prune renames the old checkpoint out of sight at once and removes it on another thread: the save
    returns while the removal is still running, and `close` waits for it."""
    saver = save_steps(tmp_path, [1], keep=1)
    release, threads = threading.Event(), []
    real_rmtree = shutil.rmtree

    def slow_rmtree(path, *args, **kwargs):
        threads.append(threading.current_thread())
        assert release.wait(30), "the test never released the removal"
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", slow_rmtree)
    saver.write(2, make_state(2), {"loader": {}}, to_yaml(Config()))  # returns with step 1's removal blocked
    assert [p.name for p in saver.step_dirs()] == ["step_00000002"]
    assert (tmp_path / ".step_00000001.deleting").is_dir()  # renamed, not yet removed
    release.set()
    saver.close()
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    saver = save_steps(tmp_path, [1])
    real_write_item = dcp_fs._write_item

    def full_disk(transforms, stream, data, *args, **kwargs):
        stream.write(b"\x00" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", full_disk)
    with pytest.raises(CheckpointError) as exc_info:
        saver.write(2, make_state(2), {"loader": {}}, to_yaml(Config()))
    monkeypatch.setattr(dcp_fs, "_write_item", real_write_item)
    assert_one_line_naming(exc_info, tmp_path / "step_00000002", "no space left on device while writing",
                            str(tmp_path / ".step_00000002.tmp"), "step_00000001 is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    assert saver.latest().name == "step_00000001"
    check_complete(saver.latest())
    assert json.loads((saver.latest() / "trainer.json").read_text())["step"] == 1


def test_async_save_writes_the_state_as_it_was_and_completes_on_poll(tmp_path):
    import time

    saver = Checkpointer(tmp_path, keep=2)
    state = make_state(1)
    expected = {k: v.clone() for k, v in state["model"].items()}
    durable = []
    final = saver.write(1, state, {"loader": {"position": 1}}, to_yaml(Config()), async_save=True,
                        on_durable=lambda step, path: durable.append((step, path)))
    for tensor in state["model"].values():  # training goes on and changes the tensors
        tensor.add_(100.0)
    assert saver.latest() is None  # not complete until the write is done and it is polled
    deadline = time.monotonic() + 30
    while not durable and time.monotonic() < deadline:
        saver.poll()
        time.sleep(0.01)
    assert durable == [(1, final)] and saver.latest() == final
    loaded = {"model": {k: torch.zeros_like(v) for k, v in expected.items()}}
    Checkpointer.load(final, loaded)
    assert all(torch.equal(loaded["model"][k], expected[k]) for k in expected)


def test_a_second_save_waits_for_the_first(tmp_path):
    saver = Checkpointer(tmp_path, keep=5)
    saver.write(1, make_state(1), {"loader": {}}, to_yaml(Config()), async_save=True)
    saver.write(2, make_state(2), {"loader": {}}, to_yaml(Config()), async_save=True)
    assert [p.name for p in saver.step_dirs()] == ["step_00000001"]
    saver.wait()
    assert [p.name for p in saver.step_dirs()] == ["step_00000001", "step_00000002"]


def test_background_saves_reuse_one_stager_and_its_host_copies(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import staging

    made, staged = [], []
    real_init, real_stage = staging.DefaultStager.__init__, staging.DefaultStager.stage

    def counting_init(self, *args, **kwargs):
        made.append(self)
        real_init(self, *args, **kwargs)

    def recording_stage(self, state_dict, **kwargs):
        out = real_stage(self, state_dict, **kwargs)
        staged.append({k: v.data_ptr() for k, v in out["model"].items()})
        return out

    monkeypatch.setattr(staging.DefaultStager, "__init__", counting_init)
    monkeypatch.setattr(staging.DefaultStager, "stage", recording_stage)
    saver = Checkpointer(tmp_path, keep=5)
    state = make_state(1)  # the same tensors at every save, as a run's weights are
    expected = []
    for step in (1, 2, 3):
        expected.append({k: v.clone() for k, v in state["model"].items()})
        saver.write(step, state, {"loader": {}}, to_yaml(Config()), async_save=True)
        for tensor in state["model"].values():  # the next step changes them while the write runs
            tensor.add_(1.0)
    saver.close()
    assert len(made) == 1  # DCP's default: a new stager, and new host copies, per save
    assert staged[0] == staged[1] == staged[2]  # each tensor staged into the same buffer every time
    for step, want in zip((1, 2, 3), expected):
        loaded = {"model": {k: torch.zeros_like(v) for k, v in want.items()}}
        Checkpointer.load(tmp_path / f"step_{step:08d}", loaded)
        assert all(torch.equal(loaded["model"][k], want[k]) for k in want)
