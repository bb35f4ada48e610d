"""The Checkpointer's states: saved once as a mapping, on its cadence, restored into the same objects;
a checkpoint of format 1 (bank tables named from level0) loads into today's names."""
import json

import torch

from hmtrain.checkpoint.checkpointer import ENGINE, LOADER, TRAIN, Checkpointer
from hmtrain.checkpoint.formats import FORMAT
from hmtrain.config import Config, to_yaml
from hmtrain.train.state import TrainState


class Tensors:
    """A state of named tensors, loaded in place (as the engine's and the bank's are)."""

    def __init__(self, **tensors):
        self.tensors = tensors

    def state_dict(self):
        return self.tensors

    def load_state_dict(self, state):
        assert all(state[name] is tensor for name, tensor in self.tensors.items())  # filled in place


class Position:
    def __init__(self, position=None):
        self.position = position

    def state_dict(self):
        return self.position

    def load_state_dict(self, state):
        self.position = state


def states(seed: float, step: int = 0):
    engine = Tensors(model=torch.full((3,), seed))  # the engine's entries sit at the top level
    bank = Tensors(**{"level1.weight": torch.full((2, 2), seed), "level2.weight": torch.full((4,), seed)})
    return {ENGINE: engine, "bank": bank, TRAIN: TrainState(step=step, optimizer_phase="memory", mlflow_run_id="r"),
            LOADER: Position({"epoch": 0, "position": step})}


def test_save_follows_the_cadence_and_restore_fills_every_state(tmp_path):
    saved = states(1.0)
    saver = Checkpointer(tmp_path, saved, every=2, keep=5, config_yaml=to_yaml(Config()))
    written = {}
    for step, last, now in [(1, False, False), (2, False, False), (3, False, True), (5, True, False)]:
        saved[TRAIN].step = step
        saved[LOADER].position = {"epoch": 0, "position": step}
        written[step] = saver.save(step, last=last, now=now)
    assert written[1] is None
    assert [p.name for p in saver.step_dirs()] == ["step_00000002", "step_00000003", "step_00000005"]
    record = json.loads((written[5] / "trainer.json").read_text())
    assert record["format"] == FORMAT and record["step"] == 5 and record["loader"] == {"epoch": 0, "position": 5}
    assert record["optimizer_phase"] == "memory" and record["mlflow_run_id"] == "r"

    fresh = states(0.0)
    fresh[TRAIN].mlflow_run_id = None
    Checkpointer(tmp_path, fresh).restore(written[3])
    assert torch.equal(fresh[ENGINE].tensors["model"], torch.full((3,), 1.0))
    assert torch.equal(fresh["bank"].tensors["level2.weight"], torch.full((4,), 1.0))
    assert fresh[TRAIN].step == 3 and fresh[TRAIN].mlflow_run_id == "r" and fresh[TRAIN].optimizer_phase == "memory"
    assert fresh[LOADER].position == {"epoch": 0, "position": 3}


def test_a_format_1_checkpoint_loads_its_level0_tables_into_level1(tmp_path):
    old = {"model": torch.full((3,), 7.0),
           "bank": {"level0.weight": torch.full((2, 2), 7.0), "level1.weight": torch.full((4,), 8.0)}}
    Checkpointer(tmp_path).write(4, old, {"loader": {"epoch": 0, "position": 4}, "optimizer_phase": "memory"},
                                 to_yaml(Config()))  # no `format`: what d1e6143 wrote
    fresh = states(0.0)
    record = Checkpointer(tmp_path, fresh).restore(tmp_path / "step_00000004")
    assert "format" not in record
    assert torch.equal(fresh["bank"].tensors["level1.weight"], torch.full((2, 2), 7.0))
    assert torch.equal(fresh["bank"].tensors["level2.weight"], torch.full((4,), 8.0))
