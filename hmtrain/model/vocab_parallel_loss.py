"""The chunked LM loss of a head split over the vocabulary (Megatron's vocabulary-parallel cross-entropy).

Under tensor parallelism (hmtrain/parallel/tensor_parallel.py) the head's [V, d] weight is a DTensor sharded
by rows over the tensor-parallel group: rank r holds vocabulary ids [r V/N, (r+1) V/N). Each rank computes its
slice of a chunk's logits only, [n, V/N], so no rank ever holds a token's full row of logits, and one chunk's
slice at a time, as `lm_loss_sum` does. Per chunk the ranks agree on three numbers per token with two
all-reduces: the row maximum (MAX), then the sum of exponentials and the target's logit (SUM; only the rank
owning the target contributes it). The loss is then the same on every rank. As in `lm_loss_sum` the forward
turns each chunk at once into its gradients: this rank's slice of the head's gradient, and its part of the
hidden states' gradient, summed over the group once for the whole batch (the head's backward all-reduce,
issued in forward because the gradient is known there). Backward only scales both by the incoming gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hmtrain.model.chunk_grads import chunked_loss_and_grads, scaled_grads


def _chunk_loss_and_grad(h: Tensor, weight: Tensor, target: Tensor, keep: Tensor, vocab_start: int,
                         group: dist.ProcessGroup, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """One chunk against this rank's vocabulary slice: its summed loss (fp32, the whole vocabulary's, equal on
    every rank) and d(loss)/d(this slice's logits) in h's dtype (None without grads)."""
    logits = (h @ weight.T).float()  # [n, V / N] fp32: the one large buffer, reused in place below
    local = target - vocab_start
    owns = keep & (local >= 0) & (local < weight.shape[0])  # this rank holds the token's target id
    safe_local = local.masked_fill(~owns, 0)[:, None]
    row_max = logits.amax(dim=-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    target_logit = torch.where(owns, logits.gather(1, safe_local).squeeze(1), 0.0)
    exp = logits.sub_(row_max[:, None]).exp_()
    stats = torch.stack([exp.sum(dim=-1), target_logit])  # one all-reduce for both sums
    dist.all_reduce(stats, group=group)
    sum_exp, target_logit = stats[0], stats[1]
    loss = torch.where(keep, row_max + sum_exp.log() - target_logit, 0.0).sum()
    if not need_grad:
        return loss, None
    # d(loss)/d(logits) = softmax - onehot(target) on this slice, zero on ignored tokens
    grad_logits = exp.div_(sum_exp[:, None])
    grad_logits.scatter_add_(1, safe_local, -owns.to(grad_logits.dtype)[:, None])
    grad_logits.mul_(keep[:, None])
    return loss, grad_logits.to(h.dtype)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, group: dist.ProcessGroup,
                chunk_tokens: int, hidden_needs_grad: bool, weight_needs_grad: bool) -> tuple[Tensor, Tensor]:
        # hidden [N, d] (the same on every rank of the group), weight [V / N, d] this rank's rows, labels [N];
        # the hidden rows' gradient is this slice's part, summed over the group below
        loss_sum, grad_hidden, grad_weight, count = chunked_loss_and_grads(
            hidden, weight, labels, chunk_tokens, hidden_needs_grad, weight_needs_grad,
            lambda h, y, keep, need: _chunk_loss_and_grad(h, weight, y, keep, vocab_start, group, need))
        if grad_hidden is not None:
            dist.all_reduce(grad_hidden, group=group)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(count)
        return loss_sum, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_count: Tensor):
        return (*scaled_grads(ctx, grad_loss), None, None, None, None, None, None)


def vocab_parallel_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int,
                            group: dist.ProcessGroup, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """`lm_loss_sum` with `weight` this rank's rows [vocab_start, vocab_start + rows) of the head: hidden [N, d]
    and weight in one dtype, labels [N] (flattened and cast by `lm_loss_sum`, which calls this)."""
    grad_on = torch.is_grad_enabled()
    return _VocabParallelCrossEntropy.apply(hidden, weight, labels, vocab_start, group, chunk_tokens,
                                            grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
