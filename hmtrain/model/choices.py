"""Multiple-choice scoring: the summed log-probability of each choice's tokens after its prompt.

The one scorer of probe questions: `hmtrain eval` calls it on one process with a checkpoint's bank
(hmtrain/eval/scoring.py), validation during training with the live, sharded bank under torchrun
(hmtrain/train/probe_validation.py). What differs between them is `forward`, which fetches the batch's
memory its own way, and the batch shape: validation pads every batch to `rows` x `width` and runs at
least `rounds` batches, because each forward is a collective there.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

# (tokens [rows, width] on the device, paths [n, L] routing the memory of its first n rows: the real pairs)
# -> logits [rows, width, vocab]
Forward = Callable[[Tensor, Tensor], Tensor]


def choice_batch(prompts: Sequence[list[int]], choices: Sequence[list[int]], pad_id: int, rows: int = 0,
                 width: int = 0) -> tuple[Tensor, Tensor]:
    """(tokens [rows, width], mask of the positions whose next token is a choice token): prompt + choice per row,
    then padding; rows and width at least what the pairs need (0: just that)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, choices)]
    width = max(width, *(len(s) for s in seqs)) if seqs else max(width, 1)
    tokens = torch.full((max(rows, len(seqs)), width), pad_id, dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, (prompt, seq) in enumerate(zip(prompts, seqs)):
        tokens[row, :len(seq)] = torch.tensor(seq)
        # logits at position t predict token t+1: choice tokens are predicted from the prompt's end on
        mask[row, len(prompt) - 1:len(seq) - 1] = True
    return tokens, mask


@torch.no_grad()
def choice_logprobs(forward: Forward, prompts: Sequence[list[int]], choices: Sequence[list[int]], paths: Tensor,
                    pad_id: int, device: torch.device, *, batch_size: int = 64, rows: int = 0, width: int = 0,
                    rounds: int = 0, bar=None) -> Tensor:
    """Sum of log p(choice tokens | prompt) for each (prompt, choice) pair, in batches of `batch_size` pairs;
    `paths[i]` routes pair i's memory. `rows`, `width`: pad each batch to that shape; `rounds`: run at least
    that many batches (the ones past the pairs hold padding alone). `bar`: updated once per batch."""
    scores = torch.empty(len(prompts))
    batches = max(-(-len(prompts) // batch_size), rounds)
    for b in range(batches):
        start, stop = min(b * batch_size, len(prompts)), min((b + 1) * batch_size, len(prompts))
        tokens, mask = choice_batch(prompts[start:stop], choices[start:stop], pad_id, rows, width)
        tokens, mask = tokens.to(device), mask.to(device)
        logits = forward(tokens, paths[start:stop])
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        scores[start:stop] = (picked * mask[:, :-1]).sum(-1)[:stop - start].cpu()
        if bar is not None:
            bar.update(1)
    return scores


def fixed_width(prompts: Sequence[list[int]], choices: Sequence[list[int]]) -> int:
    """The longest pair: one batch shape for every batch of these pairs."""
    return max((len(p) + len(c) for p, c in zip(prompts, choices)), default=1)

