"""Everything a run trains with, built once: model (parallelized), recipe, bank, engine, data stream.

`engine_for_step` builds the anchor's engine for a step's phase; `restore_in_phase` loads a checkpoint
into it, deciding whether the checkpoint's optimizer state carries over.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from hmtrain.config import Config, ModelConfig, split_global_batch
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.loader import StepLoader
from hmtrain.memory import Comm, MemoryBank, UnitSplit, build_bank, uses_memory
from hmtrain.memory.layout import group_routing
from hmtrain.model import Transformer, build_model, run_model_config
from hmtrain.parallel import Precision, resolve_precision
from hmtrain.parallel.dist import DistInfo, SideGroups, side_groups
from hmtrain.parallel.engine import Engine
from hmtrain.parallel.parallelize import parallelize
from hmtrain.parallel.placement import assign_groups
from hmtrain.parallel.tensor_parallel import check_tensor_parallel
from hmtrain.parallel.torch_engine import TorchEngine
from hmtrain.train.recipe import Recipe
from hmtrain.train.state import Batches

log = logging.getLogger(__name__)


def resolve_vocab(cfg: Config, data: PreparedData) -> Config:
    """Tie the model's vocabulary to the tokenizer the data was prepared with (padded, as the paper's)."""
    tokenizer_vocab = int(data.manifest["vocab_size"])
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = padded_vocab(cfg, data)
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ValueError(f"config key 'model.vocab_size' is {cfg.model.vocab_size}, smaller than the tokenizer's "
                         f"{tokenizer_vocab} in {data.root}")
    if cfg.model.family == "memory_model":  # a memory model never scores padding, and blank copy writes it
        cfg.memory_model.pad_id = int(data.manifest["pad_id"])
    return cfg


def padded_vocab(cfg: Config, data: PreparedData) -> int:
    """`model.vocab_size: null`'s value: the tokenizer's size padded up to `model.vocab_multiple` rows."""
    multiple = cfg.model.vocab_multiple
    return -(-int(data.manifest["vocab_size"]) // multiple) * multiple


def run_model(cfg: Config, data: PreparedData) -> ModelConfig:
    """The model the run will train (the dense baseline is sized by parameter count, the vocabulary's included),
    before `resolve_vocab` has filled in the vocabulary."""
    model = cfg.model
    if cfg.train.mode != "dense" or model.family != "lm":
        return model
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=padded_vocab(cfg, data))
    return run_model_config(model, cfg.train.mode, cfg.train.dense_multiplier)


def micro_batches_per_step(global_batch: int, micro: int, world: int) -> int:
    return split_global_batch(global_batch, world, micro_batch_size=micro)[0]


def check_world(cfg: Config, world_size: int, data: PreparedData) -> None:
    """What the world size decides, checked before anything is built or written: the tensor-parallel degree
    fits it and the model; every phase's global batch splits across the data-parallel ranks; settings one process
    ignores are said to be ignored. (Owner placement runs on any world size: past k_1 ranks its groups hold
    several ranks each, hmtrain/parallel/placement.py.)"""
    tc = cfg.train
    if cfg.parallel.tensor_parallel > 1:
        check_tensor_parallel(cfg, world_size, run_model(cfg, data))
    data_parallel = world_size // cfg.parallel.tensor_parallel
    batches = {"train.global_batch_size": tc.global_batch_size, "train.pretrain_global_batch_size":
               tc.pretrain_global_batch_size}
    for key, batch in batches.items():
        if batch is not None:
            split_global_batch(batch, data_parallel, micro_batch_size=tc.micro_batch_size,
                               name=f"config key '{key}'")
    if world_size == 1:
        ignored = [f"parallel.{key}={value}" for key, value in (("engine", cfg.parallel.engine),
                   ("backend", cfg.parallel.backend)) if value in ("deepspeed", "nccl")]
        if ignored:
            log.warning("%s: ignored on one process (the anchor trains as a plain module)", ", ".join(ignored))


@dataclass
class Parts:
    cfg: Config
    info: DistInfo
    data: PreparedData
    precision: Precision
    comm: Comm  # the bank's and the loop's collectives (host integers on groups.control)
    groups: SideGroups  # gloo groups: the host-side control plane, background checkpoint writes
    model: Transformer
    recipe: Recipe
    bank: Optional[MemoryBank]
    engine: Engine
    batches: Batches
    owner_of_subtree: Optional[np.ndarray] = None  # owner placement: level-1 node -> its group (None: gather)
    group_size: int = 1  # owner placement: ranks per group (group g: ranks g*R .. g*R + R - 1)

    def accumulation(self, step: int) -> int:
        """Micro-batches per optimizer step on this rank, at `step`'s global batch."""
        tc = self.cfg.train
        return micro_batches_per_step(self.recipe.at(step).global_batch, tc.micro_batch_size, self.info.dp_size)

    def engine_for_step(self, step: int) -> Engine:
        return engine_for_step(self.model, self.cfg, self.info, self.recipe, step, self.precision)


def engine_for_step(model: Transformer, cfg: Config, info: DistInfo, recipe: Recipe, step: int,
                    precision: Precision) -> Engine:
    """The anchor's engine for `step`'s phase: FSDP2 (or a plain module on one process), or DeepSpeed ZeRO."""
    optim = recipe.anchor_optim(recipe.phase(step))
    if info.distributed and cfg.parallel.engine == "deepspeed":
        from hmtrain.parallel.deepspeed_engine import DeepSpeedEngine

        batch = recipe.at(step).global_batch
        return DeepSpeedEngine(model, optim, info.device, zero_stage=cfg.parallel.zero_stage,
                               micro_batch=cfg.train.micro_batch_size,
                               accumulation=micro_batches_per_step(batch, cfg.train.micro_batch_size, info.world_size),
                               world_size=info.world_size, bf16=precision.autocast_dtype == torch.bfloat16)
    return TorchEngine(model, optim, info.device)


def build(cfg: Config, info: DistInfo, data: PreparedData) -> Parts:
    """Build the run for step 0; a resume then loads a checkpoint into it (`restore_in_phase`)."""
    tc = cfg.train
    precision = resolve_precision(tc, info.device)
    cfg = resolve_vocab(cfg, data)
    # host-side integers and background checkpoint writes each on their own gloo group, NCCL or not
    side = side_groups(info, cfg.parallel.timeout_s, cfg.parallel.checkpoint_timeout_s)
    comm = Comm(device=info.collective_device, control_group=side.control,
                timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))  # the owner groups' timeout

    torch.manual_seed(tc.seed)  # the same initial anchor on every rank, sharded afterwards
    model = build_model(cfg, run_model_config(cfg.model, tc.mode, tc.dense_multiplier)).to(info.device)
    model = parallelize(model, cfg.parallel, info, precision.autocast_dtype)
    recipe = Recipe(cfg, has_memory=uses_memory(cfg))
    owner_of_subtree, group_size, home, level = None, 1, None, 0
    if cfg.parallel.placement == "owner" and info.dp_size > 1:  # groups of data-parallel ranks
        groups = assign_groups(data.manifest["node_tokens"][0], info.dp_size)
        owner_of_subtree, group_size = groups.group_of_subtree, groups.group_size
        # inside a group, each rank runs the sequences whose rows it stores first (data/loading/route.py)
        home, level = group_routing(cfg.tree.branching, cfg.parallel.replicate_levels, owner_of_subtree,
                                    groups.subtrees_per_group, info.dp_size, group_size)
    bank = None
    if recipe.has_memory:
        bank_comm, unit_split = bank_ranks(info, comm, cfg.parallel.timeout_s)
        bank = build_bank(cfg, info.device, comm=bank_comm, owner_of_subtree=owner_of_subtree,
                          group_size=group_size, unit_split=unit_split)

    def loader(global_batch: int) -> StepLoader:
        # the ranks of a tensor-parallel group read the same micro-batches: the loader sees data-parallel ranks
        micro = micro_batches_per_step(global_batch, tc.micro_batch_size, info.dp_size)
        return StepLoader(data, "train", global_batch=global_batch, micro_batches=micro, seed=tc.seed,
                          rank=info.dp_rank, world_size=info.dp_size, owner_of_subtree=owner_of_subtree,
                          group_size=group_size, home_of_node=home, home_level=level,
                          num_workers=cfg.data.num_workers)

    engine = engine_for_step(model, cfg, info, recipe, 0, precision)
    return Parts(cfg, info, data, precision, comm, side, model, recipe, bank, engine, Batches(loader),
                 owner_of_subtree, group_size)


def bank_ranks(info: DistInfo, comm: Comm, timeout_s: int) -> tuple[Comm, Optional[UnitSplit]]:
    """The bank's ranks and its share of each row: the world's and whole rows; under tensor parallelism the
    data-parallel group of this rank's tensor-parallel place (its rows' owners, its id exchange) and its units
    (hmtrain/memory/unit_split.py). Collective when tensor-parallel: every rank makes every group's control
    group, in the same order."""
    n = info.tensor_parallel
    if n == 1:
        return comm, None
    timeout = datetime.timedelta(seconds=timeout_s)
    data_parallel_groups = [[d * n + t for d in range(info.dp_size)] for t in range(n)]  # the mesh's dp columns
    control, _ = dist.new_subgroups_by_enumeration(data_parallel_groups, timeout=timeout, backend="gloo")
    dp = Comm(info.mesh["dp"].get_group(), info.collective_device, control_group=control, timeout=timeout,
              siblings=data_parallel_groups)
    tp = Comm(info.mesh["tp"].get_group(), info.collective_device)
    return dp, UnitSplit(info.tp_rank, n, tp, info.mesh)


def restore_in_phase(engine: Engine, model, recipe: Recipe, step: int, saved_phase: Optional[str],
                     accumulation: int, restore: Callable[[], dict], checkpoint: Path) -> bool:
    """Load a checkpoint of `step` (`restore()` fills every state, `engine` among them) so that the anchor's
    optimizer state carries over only within a phase. Returns whether `step` begins a new stage.

    The load needs an optimizer shaped as the saved one: its parameters trainable or frozen, and in the
    curriculum stage, as at the step it last took (`step - 1`), its state initialised where they train
    (building the load template steps it once, with zero moments; a frozen anchor's saved optimizer has no
    state, and neither has the template). Same phase: the loaded moments and the engine's own files are
    kept. A checkpoint taken at the phase switch: the new phase starts afresh, as the uninterrupted run did.
    """
    optim = recipe.anchor_optim(recipe.phase(step))
    last = max(step - 1, 0)
    recipe.apply_stage(model, last, fresh=False)  # its saved optimizer's params
    engine.reset(optim, accumulation)
    if not recipe.at(last).anchor_trains:  # after the reset: DeepSpeed's is built on trainable parameters
        engine.set_trainable(False)
    restore()
    if saved_phase == recipe.phase(step):
        engine.load_extra(checkpoint)
        return False
    engine.reset(optim, accumulation)  # drop the loaded moments (and the template's one step)
    return True
