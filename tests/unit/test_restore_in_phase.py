"""Resuming the anchor's engine: the optimizer state carries over within a phase and starts afresh when
the checkpoint was taken at the phase switch (hmtrain/train/build.py `restore_in_phase`)."""
from types import SimpleNamespace

import torch

from hmtrain.checkpoint.checkpointer import ENGINE, LOADER, TRAIN, Checkpointer
from hmtrain.config import Config, ModelConfig, OptimConfig, to_yaml
from hmtrain.model import Transformer
from hmtrain.parallel.torch_engine import TorchEngine
from hmtrain.train.build import restore_in_phase
from hmtrain.train.state import TrainState

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, head_dim=8, ffn_hidden=24)


class TwoPhases:
    """A recipe whose phase switches at step 2, recording the stages it is asked to apply."""

    def __init__(self):
        self.stages = []

    def phase(self, step):
        return "pretrain" if step < 2 else "memory"

    def anchor_optim(self, phase):
        return OptimConfig(lr=1e-3, weight_decay=0.1 if phase == "pretrain" else 0.01)

    def apply_stage(self, model, step, *, fresh):
        self.stages.append((step, fresh))

    def at(self, step):
        return SimpleNamespace(anchor_trains=True)  # co-trained: the anchor's optimizer steps in both phases


class Position:
    def __init__(self):
        self.position = {"epoch": 0, "position": 0}

    def state_dict(self):
        return self.position

    def load_state_dict(self, state):
        self.position = state


def trained_engine(seed, optim):
    torch.manual_seed(seed)
    model = Transformer(CFG, max_seq_len=8)
    engine = TorchEngine(model, optim, torch.device("cpu"))
    tokens = torch.randint(0, 64, (2, 8))
    engine.model(tokens, labels=tokens)[0].backward()
    engine.step(1e-3, engine.grad_sq_norm().sqrt(), 1.0)
    return engine


def checkpoint(tmp_path, step, phase):
    engine = trained_engine(0, TwoPhases().anchor_optim(phase))  # as trained in the checkpoint's phase
    states = {ENGINE: engine, TRAIN: TrainState(step=step, optimizer_phase=phase), LOADER: Position()}
    path = Checkpointer(tmp_path, states, config_yaml=to_yaml(Config())).save(step, last=True)
    return engine, path


def resume(path, step, phase):
    engine, recipe = trained_engine(1, TwoPhases().anchor_optim("pretrain")), TwoPhases()
    states = {ENGINE: engine, TRAIN: TrainState(), LOADER: Position()}
    begins = restore_in_phase(engine, engine.model, recipe, step, phase, 1,
                              lambda: Checkpointer(path.parent, states).restore(path), path)
    return engine, recipe, begins


def moments(engine):
    return [state["exp_avg"] for state in engine.optimizer.state.values()]


def test_within_a_phase_the_saved_moments_carry_over(tmp_path):
    saved, path = checkpoint(tmp_path, 3, "memory")
    engine, recipe, begins = resume(path, 3, "memory")
    assert not begins and recipe.stages == [(2, False)]  # the stage of the step the optimizer last took
    assert all(torch.equal(a, b) for a, b in zip(engine.model.parameters(), saved.model.parameters()))
    assert len(moments(engine)) == len(moments(saved)) > 0
    assert all(torch.equal(a, b) for a, b in zip(moments(engine), moments(saved)))
    assert engine.optimizer.param_groups[0]["weight_decay"] == 0.01  # the phase's hyper-parameters


def test_at_the_phase_switch_the_weights_load_and_the_optimizer_starts_afresh(tmp_path):
    saved, path = checkpoint(tmp_path, 2, "pretrain")
    engine, recipe, begins = resume(path, 2, "pretrain")
    assert begins and recipe.stages == [(1, False)]
    assert all(torch.equal(a, b) for a, b in zip(engine.model.parameters(), saved.model.parameters()))
    assert not engine.optimizer.state  # no moments, no step: as the uninterrupted run entered the phase
    assert engine.optimizer.param_groups[0]["weight_decay"] == 0.01
