"""The memory models' objectives as label layouts: what the model reads and what it must emit, per chunk.

A sequence of T = s x n tokens is cut into s chunks of n tokens: x[b, c, j] = tokens[b, c*n + j].
An objective turns it into one or more parts; a part holds
  inputs  [R, s, n]  the tokens the encoder and decoder read
  targets [R, s, n]  the token to emit at each position (-100: not scored; padding is never scored)
  scored             the chunks that have any target (fixed by the objective, not by the data)
The decoder of chunk c emits targets[:, c, j] having read inputs[:, c, :j] and the memories of
chunks 0..c-1 (hmtrain/model/memory_model.py), so every position of a scored chunk is one target.

  autoencode  inputs x, targets x: a chunk's own tokens, unshifted, from its own vector
  clm         inputs x, targets x: next-token prediction inside each chunk (its first token from the
              memories alone)
  copy        h = s/2; inputs [x_0..x_{h-1}, x_0..x_{h-1}], targets [-100 x h, x_0..x_{h-1}]: the second
              half repeats the first (the chunk boundary is the delimiter); only the copy is scored
  blank_copy  inputs [x_0..x_{h-1}, pad x h], targets as copy: the copy must come from the memories
  combined    two parts, clm and blank_copy, scored together (the paper's fix for clm-only memories)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hmtrain.config import Objective
from hmtrain.util.labels import IGNORE_INDEX

OBJECTIVES = Objective.values()


@dataclass(frozen=True)
class ObjectivePart:
    inputs: Tensor  # [R, s, n]
    targets: Tensor  # [R, s, n], -100 where nothing is scored
    scored: tuple[int, ...]


def to_chunks(tokens: Tensor, chunks: int) -> Tensor:
    """[B, s*n] -> [B, s, n]."""
    B, T = tokens.shape
    if T % chunks:
        raise ValueError(f"a sequence of {T} tokens does not split into {chunks} chunks")
    return tokens.reshape(B, chunks, T // chunks)


def _scored_only(x: Tensor, pad_id: int) -> Tensor:
    return x.masked_fill(x == pad_id, IGNORE_INDEX)


def _copy_part(x: Tensor, pad_id: int, blank: bool) -> ObjectivePart:
    s = x.shape[1]
    if s % 2:  # the config validates this; kept exact for direct callers
        raise ValueError(f"copy objectives need an even number of chunks, got {s}")
    h = s // 2
    first = x[:, :h]
    second = torch.full_like(first, pad_id) if blank else first
    inputs = torch.cat([first, second], dim=1)
    targets = torch.cat([torch.full_like(first, IGNORE_INDEX), _scored_only(first, pad_id)], dim=1)
    return ObjectivePart(inputs, targets, tuple(range(h, s)))


def layout(tokens: Tensor, objective: str, chunks: int, pad_id: int) -> list[ObjectivePart]:
    """The parts of `objective` for a batch of sequences `tokens` [B, chunks * n]."""
    x = to_chunks(tokens, chunks)
    everything = tuple(range(chunks))
    if objective in ("autoencode", "clm"):
        return [ObjectivePart(x, _scored_only(x, pad_id), everything)]
    if objective == "copy":
        return [_copy_part(x, pad_id, blank=False)]
    if objective == "blank_copy":
        return [_copy_part(x, pad_id, blank=True)]
    if objective == "combined":
        return [ObjectivePart(x, _scored_only(x, pad_id), everything), _copy_part(x, pad_id, blank=True)]
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def count_targets(tokens: Tensor, objective: str, chunks: int, pad_id: int) -> Tensor:
    """Positions scored by `objective` (an int64 scalar on tokens' device): the loss's normaliser."""
    return sum((part.targets != IGNORE_INDEX).sum() for part in layout(tokens, objective, chunks, pad_id))
