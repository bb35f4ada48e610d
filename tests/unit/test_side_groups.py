"""The side process groups: the control plane's and the checkpoint's, each with its own timeout."""
import torch

from hmtrain.config import Config, ConfigError
from hmtrain.info import checkpoint_timeout_s, usr1_margin_s
from hmtrain.parallel import dist as hdist


def test_the_checkpoint_group_waits_as_long_as_a_save_may_take(monkeypatch):
    made = []
    monkeypatch.setattr(hdist, "new_group", lambda backend, timeout_s: made.append((backend, timeout_s)) or object())
    info = hdist.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    assert info.distributed
    groups = hdist.side_groups(info, 120, 1800)
    assert made == [("gloo", 120), ("gloo", 1800)]  # control first, then the checkpoint's
    assert groups.control is not None and groups.checkpoint is not None


def test_checkpoint_timeout_must_be_positive():
    cfg = Config()
    cfg.parallel.checkpoint_timeout_s = 0
    try:
        cfg.parallel.validate(levels=len(cfg.tree.branching))
    except ConfigError as exc:
        assert "parallel.checkpoint_timeout_s" in str(exc)
    else:
        raise AssertionError("checkpoint_timeout_s=0 was accepted")


def test_the_usr1_margin_and_checkpoint_timeout_follow_the_write_time():
    assert usr1_margin_s(0.5) == 120 and checkpoint_timeout_s(1.0) == 600  # the floors
    assert usr1_margin_s(230.0) == 2 * 230 + 60  # paper-1.4b's 230 GB at 1 GB/s
    assert checkpoint_timeout_s(230.0) == 920
