"""`train`: the loop (the paper's two phases, batch shape, checkpoints), and the one rule that splits a
global batch into micro-batches over ranks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hmtrain.config.checks import Choice, ConfigError, require, require_positive
from hmtrain.config.optim import OptimConfig


class Mode(Choice):
    hierarchical = "hierarchical"  # anchor pretraining then the memory phase
    dense = "dense"  # a baseline of dense_multiplier x the anchor's parameters


class AnchorMode(Choice):
    frozen = "frozen"
    cotrain = "cotrain"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


def split_global_batch(global_batch: int, world_size: int, *, micro_batch_size: Optional[int] = None,
                       micro_batches: Optional[int] = None, name: str = "config key 'train.global_batch_size'"
                       ) -> tuple[int, int]:
    """(micro_batches, micro_batch_size) with global_batch = world_size x micro_batches x micro_batch_size.

    Give one of the two: the other is what divides out. ConfigError naming `name` (the input the global
    batch came from) when the global batch does not split evenly."""
    if (micro_batch_size is None) == (micro_batches is None):
        raise TypeError("split_global_batch needs exactly one of micro_batch_size and micro_batches")
    given = micro_batch_size if micro_batches is None else micro_batches
    if world_size < 1 or given < 1:
        raise ConfigError(f"{name}: needs at least one rank and one micro-batch, got {world_size} ranks and "
                          f"{micro_batches if micro_batch_size is None else f'micro-batches of {micro_batch_size}'}")
    if global_batch < 1 or global_batch % (world_size * given):
        what = f"micro-batches of {micro_batch_size}" if micro_batches is None else f"{micro_batches} micro-batches"
        ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
        raise ConfigError(f"{name}: a global batch of {global_batch} sequences does not split into {what} per rank "
                          f"on {ranks} (need a positive multiple of {world_size * given})")
    other = global_batch // (world_size * given)
    return (other, given) if micro_batches is None else (given, other)


@dataclass
class TrainConfig:
    # where checkpoints, metrics.jsonl and config.yaml go (one `train` at a time per directory)
    run_dir: str = "runs/default"
    # seed of the initial weights and of every draw in a step (>= 0; no RNG state is saved)
    seed: int = 0
    # hierarchical (anchor, then anchor + memory) or dense (a baseline of dense_multiplier x the anchor)
    mode: Mode = Mode.hierarchical
    # dense mode: total parameters as a multiple of the anchor's (paper: > 2x)
    dense_multiplier: float = 2.0
    # sequences per optimizer step, over all ranks (paper: 1,024 x 2,048 tokens = 2M tokens)
    global_batch_size: int = 8
    # sequences per forward pass on one rank; global / (micro x ranks) micro-batches are accumulated
    micro_batch_size: int = 8
    # anchor pretraining's global batch (paper: 1M tokens, half the memory phase's); null: the same
    pretrain_global_batch_size: Optional[int] = None
    # optimizer steps of anchor pretraining (phase 1)
    pretrain_steps: int = 1000
    # optimizer steps of the memory phase (phase 2: every sequence fetches its path's blocks)
    memory_steps: int = 1000
    # the anchor during the memory phase
    anchor: AnchorMode = AnchorMode.frozen
    # probability a sequence uses the generic memory while co-training; null = 1/(k_1+1)
    generic_prob: Optional[float] = None
    # global gradient-norm clipping over anchor and bank together (0: off)
    clip_grad: float = 1.0
    # anchor pretraining (and the dense baseline): its schedule anneals by the end of pretraining
    anchor_optim: OptimConfig = field(default_factory=OptimConfig)
    # the memory phase has its own schedule (paper: cosine 1e-4 -> 1e-5, wd 1e-3), for the bank and,
    # when co-trained, the anchor; `cotrain_optim` overrides it for the anchor (null: the same)
    memory_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, min_lr=1e-5, weight_decay=1e-3, warmup_steps=0)
    )
    cotrain_optim: Optional[OptimConfig] = None
    # optimizer steps between checkpoints (the last step always checkpoints)
    checkpoint_every: int = 500
    # complete checkpoints kept; older ones are pruned (>= 1)
    keep_checkpoints: int = 2
    # write checkpoints in a background thread (dcp.async_save) so steps do not wait on the disk
    async_checkpoint: bool = False
    # optimizer steps between logged metric records
    log_every: int = 10
    # optimizer steps (counted from 1) to profile: a torch.profiler trace per rank, plus a CUDA memory snapshot
    # on GPU, in <run_dir>/profiles/step_XXXXXXXX/ (hmtrain/train/profiling.py)
    profile_steps: list[int] = field(default_factory=list)
    # auto (CUDA when visible), cuda or cpu
    device: Device = Device.auto
    # auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32
    dtype: Precision = Precision.auto
    # show a progress bar on rank 0
    progress: bool = True
    # optimizer steps between validations on the held-out split (and at the last step); 0: off. They log val/loss
    # and val/ppl (the memory the phase trains with: the anchor alone in pretraining) at that step
    eval_every: int = 0
    # held-out sequences each validation scores, the first ones in id order (0: all of them)
    eval_sequences: int = 0
    # also score the held-out sequences with the generic memory (val/ppl_generic) and the anchor alone
    # (val/ppl_anchor) in the memory phase: the paper's controls, one more pass over them each
    eval_variants: bool = False
    # probe questions (data.probes) each validation scores, at most this many, balanced over frequency buckets
    # and the same ones every time (0: none). They log val/probe_acc/<bucket> and val/probe_acc/all (and
    # val/probe_acc_generic/..., val/probe_acc_anchor/... with train.eval_variants), memory routed from the question
    eval_probes: int = 0

    def validate(self) -> None:
        require(bool(self.run_dir.strip()), "train.run_dir", "is empty; name the run's directory")
        require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        require_positive(self, "train", "global_batch_size", "micro_batch_size", "checkpoint_every", "log_every",
                         "keep_checkpoints")
        split_global_batch(self.global_batch_size, 1, micro_batch_size=self.micro_batch_size)
        if self.pretrain_global_batch_size is not None:
            split_global_batch(self.pretrain_global_batch_size, 1, micro_batch_size=self.micro_batch_size,
                               name="config key 'train.pretrain_global_batch_size'")
        require(self.pretrain_steps >= 0 and self.memory_steps >= 0, "train.pretrain_steps",
                "phase lengths must be >= 0")
        require(self.pretrain_steps + self.memory_steps > 0, "train.memory_steps",
                "nothing to train: both phases are 0")
        require(self.dense_multiplier > 0, "train.dense_multiplier", "must be positive")
        if self.generic_prob is not None:
            require(0.0 <= self.generic_prob <= 1.0, "train.generic_prob",
                    f"must be in [0, 1], got {self.generic_prob}")
        require(self.eval_every >= 0, "train.eval_every", f"must be >= 0 (0: no validation), got {self.eval_every}")
        require(self.eval_sequences >= 0, "train.eval_sequences",
                f"must be >= 0 (0: the whole held-out split), got {self.eval_sequences}")
        require(self.eval_probes >= 0, "train.eval_probes",
                f"must be >= 0 (0: no probes in validation), got {self.eval_probes}")
        require(all(isinstance(s, int) and s >= 1 for s in self.profile_steps), "train.profile_steps",
                f"steps are counted from 1, got {list(self.profile_steps)}")
        for name in ("anchor_optim", "memory_optim", "cotrain_optim"):
            optim = getattr(self, name)
            if optim is not None:
                optim.validate(f"train.{name}")
