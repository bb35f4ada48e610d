"""Tensor parallelism of hmtrain's Transformer with torch's DTensor layers (torchtitan's 2-D recipe).

Per block, over the mesh's `tp` dimension (Megatron's split, torch's ParallelStyles):
  attention  wq, wk, wv column-parallel (each rank holds n_heads / N whole heads), wo row-parallel
  FFN        w_gate, w_up column-parallel (ffn_hidden / N units each), w_down row-parallel
so each block costs two all-reduces forward (after wo and w_down) and three backward (below). With the memory
on (`memory.kind=ffn`), a rank's bank holds its slice of every row's units (hmtrain/memory/unit_split.py) and
`TensorParallelFFN` runs them with its slice of the anchor's: the units are extra hidden units of the same
FFN, so the memory's partial output joins the anchor's before the one all-reduce after w_down, and costs no
communication of its own; its input is handed over once (Megatron's "f"), so a block with units all-reduces
one input gradient for w_gate, w_up and the units together: two backward, not three.
QK-norm normalises over all heads' projection together (OpenLM), which couples the ranks:
`HeadShardedRMSNorm` keeps that exact norm, each rank its slice of the gain, with one all-reduce of the
sum of squares over the tensor-parallel group (and one of its gradient).
The embedding and the head are vocabulary-parallel (`split_vocabulary`, Megatron's and torchtitan's split):
the embedding row-parallel over the vocabulary (one all-reduce of its output forward), the head's weight split
by rows the same way, so a tied head stays tied (the one DTensor), and `lm_loss_sum` on that weight computes
each rank's slice of the logits only (hmtrain/model/vocab_parallel_loss.py: one all-reduce of the hidden
states' gradient a micro-batch, two small ones per chunk of tokens). Counted under torch's CommDebugMode
(tests/unit/test_tensor_parallel_info.py), the backward ones are one before wq/wk/wv (their input handed to
them as one DTensor, whose three gradients add up first) and, without memory units, one before each of
w_gate and w_up (torch's styles; Megatron fuses those two). The norms between blocks and the final norm stay
replicated on the tensor-parallel ranks; FSDP2 then shards everything over the `dp` dimension
(hmtrain/parallel/parallelize.py). Parameters stay DTensors, so DCP checkpoints hold whole tensors.

Why not megatron-core's ColumnParallelLinear / RowParallelLinear: docs/design.md ("Tensor parallelism").
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from hmtrain.config import Config, ModelConfig
from hmtrain.config.checks import require
from hmtrain.model.transformer import ffn_with_units


def block_plan() -> dict:
    """Each attention linear of a block and its split (a fresh plan per block: styles hold their layouts); the
    FFN's are `TensorParallelFFN`'s."""
    return {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel()}


def check_tensor_parallel(cfg: Config, world_size: int, model: ModelConfig) -> None:
    """What `parallel.tensor_parallel` = N needs, checked at start (ConfigError naming the key): the run's model
    (`model`: the anchor, or the dense baseline) splits its heads and FFN units N ways, every memory level's units
    too, what this slice does not split yet is refused, and the world splits into N-rank groups."""
    n = cfg.parallel.tensor_parallel
    if n == 1:
        return
    key = "parallel.tensor_parallel"
    require(cfg.model.family == "lm", key, f"tensor parallelism splits hmtrain's own Transformer (model.family=lm), "
            f"not model.family={cfg.model.family}")
    require(cfg.parallel.engine == "fsdp", key, "tensor parallelism runs with parallel.engine=fsdp, not deepspeed")
    whose = " of the dense baseline (sized from the anchor by train.dense_multiplier)" if cfg.train.mode == "dense" \
        else ""
    require(model.n_heads % n == 0, key, f"model.n_heads={model.n_heads}{whose} is not divisible by {n}")
    require(model.ffn_hidden % n == 0, key,
            f"the FFN's {model.ffn_hidden} hidden units{whose} are not divisible by {n}")
    if model.vocab_size is None:  # the tokenizer's size, padded to a multiple of model.vocab_multiple, later
        require(model.vocab_multiple % n == 0, key, f"model.vocab_multiple={model.vocab_multiple} (the vocabulary is "
                f"padded to a multiple of it) is not divisible by {n}")
    else:
        require(model.vocab_size % n == 0, key, f"the vocabulary of {model.vocab_size} rows is not divisible by {n}")
    # a hierarchical run's units, even in its pretrain phase alone: a resume may add the memory phase
    bad = [units for units in cfg.memory.units if units % n] if cfg.train.mode == "hierarchical" else []
    require(not bad, key, f"memory.units {list(cfg.memory.units)}: {bad} not divisible by {n}")
    memory_on = cfg.train.mode == "hierarchical" and cfg.train.memory_steps > 0 and sum(cfg.memory.units) > 0
    if memory_on:  # what splits its units over tensor-parallel ranks so far: FFN units
        require(cfg.memory.kind == "ffn", "memory.kind", f"memory.kind={cfg.memory.kind} is not split across "
                f"tensor-parallel ranks yet (parallel.tensor_parallel={n}): only memory.kind=ffn is")
    # last: what the config cannot run at all comes before what the launch got wrong
    require(world_size % n == 0, key, f"world size {world_size} is not divisible by {n}")


class _SumOverGroup(torch.autograd.Function):
    """Sum over a process group whose backward sums the gradient too (Megatron's "g"): every rank's output
    feeds only its own heads, so the gradient of the sum is the group's gradients added up."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class HeadShardedRMSNorm(nn.Module):
    """The anchor's RMSNorm over a dimension split across the tensor-parallel group: the mean of squares is
    summed over the group (an autograd all-reduce, whose backward all-reduces the gradient), the gain is
    this rank's slice of a DTensor sharded as the column-parallel projection before it."""

    def __init__(self, norm: nn.Module, mesh: DeviceMesh):
        super().__init__()
        self.eps, self.full_dim, self.group = norm.eps, norm.weight.shape[0], mesh.get_group()
        self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Shard(0)]))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        square_sum = _SumOverGroup.apply(xf.pow(2).sum(-1, keepdim=True), self.group)
        normed = xf * torch.rsqrt(square_sum / self.full_dim + self.eps)
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        return (normed * weight.float()).type_as(x)


class _CopyToGroup(torch.autograd.Function):
    """Megatron's "f": the identity forward; backward, the sum of the group's gradients (each rank's slice of
    the FFN sends back the gradient of its own hidden units only)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Megatron's "g": the sum of the group's partial outputs forward; backward, the identity (every rank's
    output gradient is the whole one, the ranks after it being replicated)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _local(weight: Tensor) -> Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


class TensorParallelFFN(nn.Module):
    """A block's FFN split over the tensor-parallel group: w_gate / w_up column-parallel, w_down row-parallel
    (torch's styles, which hold the weights as DTensors; the state dict's names are the FeedForward's).
    Without memory the styles' hooks run it (one all-reduce after w_down). With this rank's memory units
    (`FFNUnits`, its slice of every fetched row) the rank's hidden units and its memory units form one FFN
    slice (`ffn_with_units`, the memory kernel), whose partial output takes the same one all-reduce."""

    def __init__(self, ffn: nn.Module, tp_mesh: DeviceMesh):
        super().__init__()
        parallelize_module(ffn, tp_mesh, {"w_gate": ColwiseParallel(), "w_up": ColwiseParallel(),
                                          "w_down": RowwiseParallel()})
        self.w_gate, self.w_up, self.w_down = ffn.w_gate, ffn.w_up, ffn.w_down
        self.group = tp_mesh.get_group()

    def forward(self, x: Tensor, memory: tuple | None, impl: str) -> Tensor:
        if memory is None:
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        weights = tuple(_local(w.weight) for w in (self.w_gate, self.w_up, self.w_down))
        partial = ffn_with_units(_CopyToGroup.apply(x, self.group), weights, memory, impl)
        return _ReduceFromGroup.apply(partial, self.group)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block of hmtrain's Transformer over `tp_mesh` in place (before FSDP2, torchtitan's order)."""
    n = tp_mesh.size()
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan())
        block.ffn = TensorParallelFFN(block.ffn, tp_mesh)
        attn = block.attn
        attn.n_heads //= n  # the local heads: the forward views its projections as [B, T, heads, head_dim]
        if not isinstance(attn.q_norm, nn.Identity):
            attn.q_norm = HeadShardedRMSNorm(attn.q_norm, tp_mesh)
            attn.k_norm = HeadShardedRMSNorm(attn.k_norm, tp_mesh)
        # wq, wk and wv read one input: handed to them as one DTensor, their input gradients add up before a
        # single all-reduce (Megatron's fused qkv) instead of one each. Attention.forward(x, cos, sin, mask,
        # memory) as Block calls it: x replicated on the group, the rest as they are
        inputs = (Replicate(), None, None, None, None)
        parallelize_module(attn, tp_mesh, PrepareModuleInput(input_layouts=inputs, desired_input_layouts=inputs,
                                                             use_local_output=False))
    split_vocabulary(model, tp_mesh)


def split_vocabulary(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """The embedding and the head split over the vocabulary, each rank V / N rows of both: the embedding
    row-parallel (ids outside a rank's rows look up zeros, the outputs summed over the group), the head
    column-parallel (its weight [V, d] split by rows, as the embedding's). The training loss reads the head's
    weight (`output_weight`) and splits its logits itself; `model(tokens)` without labels, which training
    never calls, gathers whole logits. A tied head is given back the embedding's DTensor."""
    tied = model.output.weight is model.tok_embeddings.weight
    parallelize_module(model, tp_mesh, {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
                                        "output": ColwiseParallel(output_layouts=Replicate())})
    if tied:
        model.output.weight = model.tok_embeddings.weight
