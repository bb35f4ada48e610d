"""The train-time label rule: packed sequences -> model inputs, and padding rows that train nothing.

A stored sequence holds seq_len + 1 tokens: inputs are tokens[:-1] and targets are tokens[1:].
Inside it documents are separated by EOT and `segment_ids` numbers them so the model can mask
attention at document boundaries. Since attention cannot see across an EOT, the position after it
is not trained to predict the next document's first token (its label is IGNORE_INDEX, as OpenLM's
mask-across-documents), nor is any position whose target is the trailing padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hmtrain.util.labels import IGNORE_INDEX

PADDING_INDEX = -1  # `index` of a padding row: no sequence (sequence ids are >= 0)


def segment_ids(tokens: Tensor, eot_id: int) -> Tensor:
    """[B, T] document index within each row.

    The EOT that ends a document belongs to that document; the token after it
    starts the next segment. Padding after the last EOT forms its own segment.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    is_eot = (tokens == eot_id).long()
    # EOTs strictly before each position = inclusive count minus self.
    return torch.cumsum(is_eot, dim=1) - is_eot


def make_batch(
    samples: Sequence[tuple[np.ndarray, Sequence[int]]],
    *,
    eot_id: int,
    pad_id: int,
    index: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Stack (tokens [seq_len + 1], path) samples into model inputs.

    Returns tokens / labels / segments [B, seq_len] and paths [B, L], all int64, plus index [B]
    (the samples' sequence ids) when given. Labels are IGNORE_INDEX where the target is padding
    and where the input is an EOT: the next document's first token cannot be predicted from a
    context that attention masks away.
    """
    if eot_id == pad_id:
        raise ValueError(f"eot_id and pad_id must differ, both are {eot_id}")
    if len(samples) == 0:
        raise ValueError("make_batch needs at least one sample, got none (padding_batch makes a 0-row batch)")
    if index is not None and len(index) != len(samples):
        raise ValueError(f"index has {len(index)} entries for {len(samples)} samples")
    rows, paths = [], []
    for i, (tokens, path) in enumerate(samples):
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size < 2:
            raise ValueError(f"sample {i}: tokens must be 1-D with >= 2 entries, got shape {arr.shape}")
        if arr.size != np.asarray(samples[0][0]).size:
            raise ValueError(
                f"sample {i}: {arr.size} tokens, sample 0 has {np.asarray(samples[0][0]).size}; "
                "all samples of a batch must have the same seq_len"
            )
        p = np.asarray(path).reshape(-1)
        if p.size != np.asarray(samples[0][1]).size:
            raise ValueError(f"sample {i}: path {p.tolist()} has a different depth than sample 0")
        rows.append(arr)
        paths.append(p)
    return batch_from_arrays(np.stack(rows), np.stack(paths), eot_id=eot_id, pad_id=pad_id, index=index)


def batch_from_arrays(tokens: np.ndarray, paths: np.ndarray, *, eot_id: int, pad_id: int,
                      index: Sequence[int] | np.ndarray | None = None) -> dict[str, Tensor]:
    """make_batch for samples already stacked: tokens [B, seq_len + 1], paths [B, L]."""
    full = torch.from_numpy(np.asarray(tokens).astype(np.int64, copy=False))
    inputs, targets = full[:, :-1], full[:, 1:]

    # Padding is only ever the trailing run of pad_id (prepare/pack.py pack_leaf pads the tail
    # after an EOT), so mask that run rather than every pad_id: a pad_id inside
    # real text would otherwise lose its label.
    is_pad = (full == pad_id).long()
    trailing_pad = torch.flip(torch.cumprod(torch.flip(is_pad, dims=[1]), dim=1), dims=[1]).bool()
    labels = targets.masked_fill(trailing_pad[:, 1:] | (inputs == eot_id), IGNORE_INDEX)

    batch = {
        "tokens": inputs.contiguous(),
        "labels": labels.contiguous(),
        "segments": segment_ids(inputs, eot_id),
        "paths": torch.from_numpy(np.asarray(paths).astype(np.int64, copy=False)),
    }
    if index is not None:
        batch["index"] = torch.as_tensor(np.asarray(index, dtype=np.int64))
    return batch


def padding_batch(seq_len: int, levels: int, pad_id: int, rows: int = 0) -> dict[str, Tensor]:
    """`rows` sequences of padding with the usual fields, none of it trained (labels IGNORE_INDEX) and none
    of it a sequence (index PADDING_INDEX, so it fetches no memory and draws no generic memory).

    0 rows: the share of a rank that owns no sequence of a step; `pad_batch` fills micro-batches with it.
    """
    tokens = torch.full((rows, seq_len), pad_id, dtype=torch.int64)
    return {"tokens": tokens, "labels": torch.full_like(tokens, IGNORE_INDEX), "segments": torch.zeros_like(tokens),
            "paths": torch.zeros(rows, levels, dtype=torch.int64),
            "index": torch.full((rows,), PADDING_INDEX, dtype=torch.int64)}


def pad_batch(batch: dict[str, Tensor], rows: int, pad_id: int) -> dict[str, Tensor]:
    """`batch` with padding rows appended up to `rows`: a micro-batch of the run's one shape (compiled
    attention recompiles for every new batch size). The sequences stay first, so `real_rows` counts them."""
    have, seq_len = batch["tokens"].shape
    if have > rows:
        raise ValueError(f"pad_batch: the batch has {have} rows, more than the {rows} to pad it to")
    if have == rows:
        return batch
    padding = padding_batch(seq_len, batch["paths"].shape[1], pad_id, rows - have)
    return {key: torch.cat([value, padding[key]]) for key, value in batch.items()}


def real_rows(batch: dict[str, Tensor]) -> int:
    """Rows of `batch` that hold a sequence: the leading rows before `pad_batch`'s padding."""
    return int((batch["index"] != PADDING_INDEX).sum())
