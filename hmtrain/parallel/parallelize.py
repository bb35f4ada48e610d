"""Apply parallelism to the anchor in one place, in a fixed order (torchtitan's): tensor parallelism
(`parallel.tensor_parallel` > 1, hmtrain/parallel/tensor_parallel.py), activation checkpointing, then
torch.compile, then FSDP2 (`fully_shard` per block, then the root) over the data-parallel ranks: the
mesh's `dp` dimension under tensor parallelism, else the whole world.

The model file holds no parallelism; the bank is not part of the module and is sharded by
hmtrain/memory itself. Losses are normalised by the global token count before backward, so
FSDP must sum gradients over ranks rather than average them (divide factor 1).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from hmtrain.config import ParallelConfig
from hmtrain.parallel.dist import DistInfo
from hmtrain.parallel.tensor_parallel import apply_tensor_parallel

log = logging.getLogger(__name__)


def parallelize(model: nn.Module, parallel: ParallelConfig, info: DistInfo,
                compute_dtype: torch.dtype | None) -> nn.Module:
    """Wrap `model` for this job; returns the module to train. `model.layers` is the module list of its
    blocks, in place: hmtrain's Transformer's own, or the decoder layers of a Hugging Face model
    (HFAnchor.layers: the list of its `_no_split_modules` classes), which the HF model goes on calling."""
    if len(model.layers) == 0:
        raise ValueError(f"parallelize: {type(model).__name__} has no blocks in .layers")
    block_class = type(model.layers[0]).__name__
    if info.mesh is not None:  # check_tensor_parallel has refused all but hmtrain's own Transformer
        apply_tensor_parallel(model, info.mesh["tp"])
        log.info("anchor split over %d tensor-parallel ranks: %d blocks", info.tensor_parallel, len(model.layers))
    if parallel.activation_checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if parallel.compile:
        for block in model.layers:
            block.compile()
    if info.distributed and parallel.engine == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        dp_mesh = info.mesh["dp"] if info.mesh is not None else None  # None: the whole world
        for block in model.layers:
            fully_shard(block, mesh=dp_mesh, mp_policy=mp)
        fully_shard(model, mesh=dp_mesh, mp_policy=mp)
        for module in model.modules():  # the setting is per FSDP module: every block and the root
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                # plain SUM collectives: gloo has no PreMulSum, and NCCL's zero-copy path wants SUM too
                module.set_force_sum_reduction_for_comms(True)
        log.info("anchor sharded with FSDP2 over %d ranks: %d blocks (%s), then the root", info.dp_size,
                 len(model.layers), block_class)
    return model


def reshard_after_inference(model: nn.Module) -> None:
    """After forwards that no backward follows (validation inside training): FSDP2 keeps the root's
    parameters unsharded after forward, for the backward, which is what reshards them; a checkpoint would
    then see other parameter objects than the optimizer's. Reshard them here (no-op without FSDP)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
