"""`parallel`: how a job spreads over processes (torchrun / SLURM): anchor engine, bank placement."""
from __future__ import annotations

from dataclasses import dataclass

from hmtrain.config.checks import Choice, require, require_positive


class Engine(Choice):
    fsdp = "fsdp"  # FSDP2 fully_shard
    deepspeed = "deepspeed"  # ZeRO, stage `zero_stage`


# engines a user may ask for that are not offered, and why (the one-line error says so)
ENGINES_NOT_OFFERED = {
    "megatron": "megatron-core's GPTModel needs CUDA and has not been run by the GPU check yet, so it is not "
                "offered; tensor parallelism runs with parallel.engine=fsdp and parallel.tensor_parallel=N "
                "(docs/design.md, \"Tensor parallelism\")",
}


class Placement(Choice):
    # ranks fetch the rows their batch needs from the owners (all-to-all)
    gather = "gather"
    # each sequence goes to the rank owning its level-1 subtree, deep levels stay local
    owner = "owner"


class Fetch(Choice):
    # a step's rows of other ranks come once, before its first micro-batch, and their gradients go back once,
    # after its last: each row moves once per step however many micro-batches use it
    step = "step"
    # each micro-batch fetches its rows and returns their gradients (less memory held through the step)
    micro_batch = "micro_batch"


class Backend(Choice):
    auto = "auto"  # nccl on GPU, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


@dataclass
class ParallelConfig:
    # one process runs the plain model whatever the engine
    engine: Engine = Engine.fsdp
    # DeepSpeed ZeRO stage (1, 2 or 3) when parallel.engine=deepspeed
    zero_stage: int = 2
    # tensor-parallel degree: the ranks form a (world / N) x N mesh, data-parallel x tensor-parallel; attention
    # heads and FFN hidden units split N ways (hmtrain/parallel/tensor_parallel.py), and each
    # row's memory units too (memory.kind=ffn: hmtrain/memory/unit_split.py)
    tensor_parallel: int = 1
    # how the bank's rows are placed: gather (rows sharded, fetched by all-to-all) or owner (ranks own level-1
    # subtrees and train their sequences)
    placement: Placement = Placement.gather
    # the first n tree levels are replicated on every rank (gradients all-reduced), the rest sharded; under
    # owner placement on every rank of the group that owns their subtree
    replicate_levels: int = 0
    # how often rows owned by other ranks move: once per step (step) or once per micro-batch (micro_batch)
    fetch: Fetch = Fetch.step
    # recompute each block's activations in the backward (less memory, ~1/3 more compute)
    activation_checkpointing: bool = False
    # torch.compile each block
    compile: bool = False
    # auto (NCCL on GPU, gloo on CPU), nccl or gloo
    backend: Backend = Backend.auto
    # seconds before a collective that a dead or hung rank blocks fails the job
    timeout_s: int = 120
    # the same for a checkpoint's own collectives (its process group; saves of 50-230 GB take minutes:
    # `hmtrain info` prints the least this should be at a given write bandwidth)
    checkpoint_timeout_s: int = 1800

    def validate(self, levels: int) -> None:
        """`levels`: the tree's depth, which bounds replicate_levels."""
        require_positive(self, "parallel", "timeout_s", "checkpoint_timeout_s", "tensor_parallel")
        require(self.zero_stage in (1, 2, 3), "parallel.zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        require(0 <= self.replicate_levels <= levels, "parallel.replicate_levels",
                f"must be in [0, {levels}] (tree levels), got {self.replicate_levels}")
