"""The paper's two-phase recipe as a function of the step: phase, learning rates, batch, generic draws.

- Anchor pretraining (`pretrain_steps`): the anchor alone, `anchor_optim`, its schedule annealed by the
  end of the phase (paper App. A.1).
- The memory phase (`memory_steps`): its own schedule (`memory_optim`, paper: cosine 1e-4 -> 1e-5,
  weight decay 1e-3) for the bank and, when co-trained, for the anchor (`cotrain_optim` overrides it;
  the anchor starts the phase with fresh AdamW moments, as a separate run from the pretrained weights
  would). A frozen anchor does not step.
- `mode=dense`: the baseline trains for both phases' steps on one `anchor_optim` schedule.

A memory model (`model.family=memory_model`) has no bank: its curriculum is a list of stages
(`memory_model.stages`: autoencoder pretraining, then the memory decoder on blank copy over a frozen
encoder, then the combined objective), one after the other. Each stage is a phase of its own, named
"stage<i>:<name>": the trainer switches the model's objective and frozen parts there
(`apply_stage`) and starts the stage's AdamW with fresh moments, as at the anchor's phase switch.

While the memory trains, a sequence uses the generic memory instead of its path's with probability
`generic_prob` (default 1/(k_1+1)). The draw is a hash of (seed, step, global sequence id), so it is the
same however the batch is split over ranks and however often the run is resumed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmtrain.config import Config, OptimConfig, StageConfig
from hmtrain.train.schedule import learning_rate

PRETRAIN, MEMORY, DENSE = "pretrain", "memory", "dense"


@dataclass(frozen=True)
class StepRecipe:
    phase: str
    anchor_trains: bool
    anchor_lr: float  # 0 when the anchor does not step
    memory_lr: float  # 0 outside the memory phase
    global_batch: int


def memory_model_stages(cfg: Config) -> list[StageConfig]:
    """The curriculum of a memory model; without stages, one stage of the whole run on `objective`."""
    if cfg.memory_model.stages:
        return list(cfg.memory_model.stages)
    tc = cfg.train
    return [StageConfig(name="train", steps=tc.pretrain_steps + tc.memory_steps, objective=cfg.memory_model.objective,
                        optim=tc.anchor_optim)]


def stage_phase(index: int, stage: StageConfig) -> str:
    return f"stage{index}:{stage.name}"


class Recipe:
    def __init__(self, cfg: Config, has_memory: bool):
        self.cfg = cfg
        tc = cfg.train
        self.dense = tc.mode == "dense"
        self.has_memory = has_memory
        self.total_steps = tc.pretrain_steps + tc.memory_steps
        self.generic_prob = 0.0
        if has_memory and cfg.memory.generic:
            self.generic_prob = tc.generic_prob if tc.generic_prob is not None else 1.0 / (cfg.tree.branching[0] + 1)
        self.stages: list[StageConfig] = []
        if cfg.model.family == "memory_model":
            self.stages = memory_model_stages(cfg)
            self.stage_starts = np.cumsum([0] + [stage.steps for stage in self.stages]).tolist()
            self.total_steps = self.stage_starts[-1]

    def stage_index(self, step: int) -> int:
        """The curriculum stage of `step` (past the end: the last stage)."""
        for index in range(len(self.stages) - 1, -1, -1):
            if step >= self.stage_starts[index]:
                return index
        return 0

    def apply_stage(self, model, step: int, *, fresh: bool) -> None:
        """Put a memory model in the stage of `step`; `fresh`: that stage begins now (re-initialise its
        `reinit` parts), not a resume inside it. Nothing to do for an LM."""
        if self.stages:
            index = self.stage_index(step)
            model.set_stage(self.stages[index], index, fresh=fresh, seed=self.cfg.train.seed)

    def phase(self, step: int) -> str:
        if self.stages:
            index = self.stage_index(step)
            return stage_phase(index, self.stages[index])
        if self.dense:
            return DENSE
        if not self.has_memory or step < self.cfg.train.pretrain_steps:
            return PRETRAIN
        return MEMORY

    def anchor_optim(self, phase: str) -> OptimConfig:
        tc = self.cfg.train
        for index, stage in enumerate(self.stages):
            if phase == stage_phase(index, stage):
                return stage.optim
        if phase == MEMORY:
            return tc.cotrain_optim or tc.memory_optim
        return tc.anchor_optim

    def optim_keys(self, phase: str) -> list[str]:
        """The config keys of the optimizers that step in `phase`, for messages."""
        for index, stage in enumerate(self.stages):
            if phase == stage_phase(index, stage):
                return [f"memory_model.stages[{index}].optim" if self.cfg.memory_model.stages else "train.anchor_optim"]
        tc = self.cfg.train
        if phase == MEMORY:
            cotrain = tc.anchor == "cotrain" and tc.cotrain_optim is not None
            return ["train.memory_optim", *(["train.cotrain_optim"] if cotrain else [])]
        return ["train.anchor_optim"]

    def at(self, step: int) -> StepRecipe:
        tc = self.cfg.train
        phase = self.phase(step)
        if self.stages:
            index = self.stage_index(step)
            stage = self.stages[index]
            lr = learning_rate(stage.optim, step - self.stage_starts[index], stage.steps)
            return StepRecipe(phase, True, lr, 0.0, tc.global_batch_size)
        if phase == DENSE:
            return StepRecipe(phase, True, learning_rate(tc.anchor_optim, step, self.total_steps), 0.0,
                              tc.global_batch_size)
        if phase == PRETRAIN:
            span = tc.pretrain_steps if self.has_memory else self.total_steps
            batch = tc.pretrain_global_batch_size or tc.global_batch_size
            return StepRecipe(phase, True, learning_rate(tc.anchor_optim, step, span), 0.0, batch)
        memory_step = step - tc.pretrain_steps
        memory_lr = learning_rate(tc.memory_optim, memory_step, tc.memory_steps)
        trains = tc.anchor == "cotrain"
        anchor_lr = learning_rate(self.anchor_optim(MEMORY), memory_step, tc.memory_steps) if trains else 0.0
        return StepRecipe(phase, trains, anchor_lr, memory_lr, tc.global_batch_size)

    def generic_mask(self, step: int, sequence_ids: np.ndarray) -> np.ndarray:
        """Which sequences of this step use the generic memory (bool per sequence)."""
        if self.generic_prob <= 0.0:
            return np.zeros(len(sequence_ids), dtype=bool)
        return uniform_hash(self.cfg.train.seed, step, sequence_ids) < self.generic_prob


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def uniform_hash(seed: int, step: int, ids: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per id, a pure function of (seed, step, id)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(step))
        values = _splitmix64(np.asarray(ids, dtype=np.uint64) ^ key)
    return (values >> np.uint64(11)).astype(np.float64) / float(1 << 53)
