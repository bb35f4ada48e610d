"""What the chunked LM loss (loss.py) and its vocabulary-parallel form (vocab_parallel_loss.py) share: both
compute a chunk's gradients in the forward, so no chunk's logits are kept, and scale them by the loss's
gradient in the backward."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from hmtrain.util.labels import IGNORE_INDEX


def add_chunk_grads(grad_logits: Tensor, h: Tensor, weight: Tensor, grad_hidden_rows: Optional[Tensor],
                    grad_weight: Optional[Tensor]) -> None:
    """One chunk's part of the gradients, computed in the forward: its hidden rows' gradient written in place,
    the weight's added to the fp32 sum over chunks (shared with the vocabulary-parallel loss)."""
    if grad_hidden_rows is not None:
        torch.matmul(grad_logits, weight, out=grad_hidden_rows)
    if grad_weight is not None and h.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, h)
    elif grad_weight is not None:  # bf16/fp16 product, fp32 sum over chunks
        grad_weight.add_(grad_logits.T @ h)


def scaled_grads(ctx, grad_loss: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The backward of a loss whose forward saved (grad_hidden, grad_weight): both times the loss's gradient."""
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden is not None:
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
    if grad_weight is not None:
        grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
    return grad_hidden, grad_weight


def chunked_loss_and_grads(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, hidden_needs_grad: bool,
                           weight_needs_grad: bool, chunk_loss: Callable[..., tuple[Tensor, Optional[Tensor]]]
                           ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """The forward of a chunked loss: `chunk_loss(h, labels, keep, need_grad)` -> (the chunk's loss sum, its
    logits' gradient or None) over chunks of `chunk_tokens` rows of hidden [N, d]; returns the loss sum, the
    gradients of hidden and weight (None where not needed) and the number of tokens counted."""
    n_tokens = hidden.shape[0]
    valid = labels != IGNORE_INDEX
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if hidden_needs_grad else None
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                   if weight_needs_grad else None)
    for start in range(0, n_tokens, chunk_tokens):
        end = min(start + chunk_tokens, n_tokens)
        h = hidden[start:end]
        loss, grad_logits = chunk_loss(h, labels[start:end], valid[start:end], hidden_needs_grad or weight_needs_grad)
        loss_sum += loss
        add_chunk_grads(grad_logits, h, weight, None if grad_hidden is None else grad_hidden[start:end], grad_weight)
        del grad_logits  # free this chunk's buffer before the next chunk's logits
    return loss_sum, grad_hidden, grad_weight, valid.sum()
