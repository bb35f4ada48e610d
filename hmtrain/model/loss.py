"""The LM loss straight from the final hidden states, never holding the full [B, T, vocab] logits.

`lm_loss_sum(hidden, weight, labels)` is cross-entropy(hidden @ weight.T, labels) summed over the
tokens whose label is not -100. The tokens are processed in chunks of `chunk_tokens`: a chunk's
logits are computed in the input dtype, upcast to fp32 for the log-sum-exp, and turned at once into
the chunk's gradients for the hidden states and the head weight (the softmax minus the one-hot
target, times the chunk's inputs). Forward keeps those two gradients, not the logits; backward only
scales them by the incoming gradient (as Liger-Kernel's fused linear cross-entropy does). Peak memory
is one chunk's logits, a few times chunk_tokens x vocab, instead of several copies of B*T x vocab.

Under autocast the head runs in the autocast dtype, as `nn.Linear` would; the gradients flow back
through that cast to fp32 parameters. The weight's gradient is accumulated over chunks in fp32.
Labels must be -100 or a valid index; they are not checked here (that would sync with the GPU).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from hmtrain.model.chunk_grads import chunked_loss_and_grads, scaled_grads
from hmtrain.model.vocab_parallel_loss import vocab_parallel_loss_sum

CHUNK_TOKENS = 4096  # tokens per chunk of logits (`hmtrain info` counts one chunk's buffers)


def _chunk_loss_and_grad(h: Tensor, weight: Tensor, target: Tensor, keep: Tensor,
                         need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """One chunk: its summed loss (fp32) and d(loss)/d(logits) in h's dtype (None without grads)."""
    logits = (h @ weight.T).float()  # [n, V] fp32: the one large buffer, reused in place below
    safe_target = target.masked_fill(~keep, 0)[:, None]
    target_logit = logits.gather(1, safe_target).squeeze(1)
    row_max = logits.amax(dim=-1)
    exp = logits.sub_(row_max[:, None]).exp_()  # a log-sum-exp without a second [n, V] buffer
    sum_exp = exp.sum(dim=-1)
    loss = torch.where(keep, row_max + sum_exp.log() - target_logit, 0.0).sum()
    if not need_grad:
        return loss, None
    # d(loss)/d(logits) = softmax - onehot(target), zero on ignored tokens
    grad_logits = exp.div_(sum_exp[:, None])
    grad_logits.scatter_add_(1, safe_target, torch.full_like(target_logit, -1.0)[:, None])
    grad_logits.mul_(keep[:, None])
    return loss, grad_logits.to(h.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int,
                hidden_needs_grad: bool, weight_needs_grad: bool) -> tuple[Tensor, Tensor]:
        # hidden [N, d], weight [V, d], labels [N]; one dtype for hidden and weight
        loss_sum, grad_hidden, grad_weight, count = chunked_loss_and_grads(
            hidden, weight, labels, chunk_tokens, hidden_needs_grad, weight_needs_grad,
            lambda h, y, keep, need: _chunk_loss_and_grad(h, weight, y, keep, need))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(count)
        return loss_sum, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_count: Tensor):
        return (*scaled_grads(ctx, grad_loss), None, None, None, None)


def lm_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor,
                chunk_tokens: int = CHUNK_TOKENS) -> tuple[Tensor, Tensor]:
    """Sum of the next-token cross-entropies of `hidden @ weight.T` and the number of tokens counted.

    hidden [B, T, d] (the model's final-norm output, `Transformer.hidden_states`), weight [V, d]
    (`Transformer.output_weight`), labels [B, T] with -100 for tokens to ignore. Returns
    (loss_sum, n_tokens): an fp32 scalar, differentiable in hidden and weight, and an int64 scalar,
    both on the input's device, so a caller can add them over micro-batches without a host sync.
    A weight that is a DTensor split by rows over one mesh dimension (the tensor-parallel head) takes the
    vocabulary-parallel loss (hmtrain/model/vocab_parallel_loss.py): each rank its slice of the logits.
    """
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"lm_loss_sum: hidden must be [B, T, d] and weight [V, d], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"lm_loss_sum: labels must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if chunk_tokens <= 0:
        raise ValueError(f"lm_loss_sum: chunk_tokens must be positive, got {chunk_tokens}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.flatten(0, 1).to(dtype), weight.to(dtype)
    if isinstance(weight, DTensor):
        with torch.autocast(device_type, enabled=False):
            return _vocab_parallel(hidden, weight, labels.flatten(), chunk_tokens)
    grad_on = torch.is_grad_enabled()
    with torch.autocast(device_type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels.flatten(), chunk_tokens,
                                                grad_on and hidden.requires_grad, grad_on and weight.requires_grad)


def _vocab_parallel(hidden: Tensor, weight: DTensor, labels: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """The loss of a head whose rows are split evenly over a 1-D mesh (`Shard(0)`): this rank's rows, their
    first vocabulary id, and the mesh's group to agree with."""
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"lm_loss_sum: a DTensor head must be split by rows over one mesh dimension, got "
                         f"placements {tuple(weight.placements)} on a {weight.device_mesh.ndim}-D mesh")
    vocab, parts = weight.shape[0], weight.device_mesh.size()
    if vocab % parts:
        raise ValueError(f"lm_loss_sum: a head of {vocab} rows does not split evenly over {parts} ranks")
    local = weight.to_local()  # differentiable: its gradient becomes the DTensor's, sharded the same way
    start = weight.device_mesh.get_local_rank() * (vocab // parts)
    return vocab_parallel_loss_sum(hidden, local, labels, start, weight.device_mesh.get_group(), chunk_tokens)
