"""Packing one leaf's documents into fixed-length training sequences.

A training sequence never mixes paths (docs/design.md): `pack_leaf` is called once
per leaf, so every sequence it yields carries exactly one path. Inside a
sequence, documents are separated by EOT and `segment_ids` numbers them so the
model can mask attention at document boundaries. Since attention cannot see
across an EOT, the position after it is not trained to predict the next
document's first token (its label is masked, as OpenLM's mask-across-documents).

Each sequence holds seq_len + 1 tokens: inputs are tokens[:-1] and targets are
tokens[1:], so no token is stored twice and the stream is recoverable exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value that torch's cross_entropy skips
_INT32_MAX = np.iinfo(np.int32).max


@dataclass
class PackedSequence:
    tokens: np.ndarray  # int32 [seq_len + 1]: inputs are tokens[:-1], targets tokens[1:]
    path: tuple[int, ...]  # the leaf's full path (one node per level)
    doc_ids: list[str]  # documents (or parts of documents) inside, in order
    num_real: int  # tokens that are not padding


def _check_ids(*, seq_len: int, eot_id: int, pad_id: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    for name, value in (("eot_id", eot_id), ("pad_id", pad_id)):
        if not 0 <= value <= _INT32_MAX:
            raise ValueError(f"{name} must be in [0, 2**31), got {value}")
    if eot_id == pad_id:
        # Padding must be distinguishable from the EOT that ends the last
        # document, otherwise that EOT's label would be masked (or padding trained).
        raise ValueError(f"eot_id and pad_id must differ, both are {eot_id}")


def _doc_array(doc_id: str, tokens: Sequence[int]) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"document {doc_id!r}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"document {doc_id!r}: tokens must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > _INT32_MAX:
        raise ValueError(
            f"document {doc_id!r}: token ids must be in [0, 2**31), "
            f"got range [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int32, copy=False)


def pack_leaf(
    docs: Iterable[tuple[str, Sequence[int]]],
    *,
    path: tuple[int, ...],
    seq_len: int,
    eot_id: int,
    pad_id: int,
) -> Iterator[PackedSequence]:
    """Greedily pack one leaf's documents (each followed by EOT) into sequences.

    A document longer than the room left continues in the next sequence (its id
    appears in both). Only the final sequence is padded. Empty documents are
    skipped: a lone EOT would spend a position and teach nothing.
    """
    _check_ids(seq_len=seq_len, eot_id=eot_id, pad_id=pad_id)
    path = tuple(int(p) for p in path)
    if not path or min(path) < 0:
        raise ValueError(f"path must be a non-empty tuple of node ids >= 0, got {path}")
    window = seq_len + 1
    buf = np.empty(window, dtype=np.int32)
    fill = 0
    doc_ids: list[str] = []
    last_doc = -1  # index (not id) of the document last written to buf: ids may repeat

    for doc_index, (doc_id, doc_tokens) in enumerate(docs):
        arr = _doc_array(doc_id, doc_tokens)
        if arr.size == 0:
            continue
        pos = 0
        total = arr.size + 1  # the document plus its EOT
        while pos < total:
            take = min(window - fill, total - pos)
            body = min(take, arr.size - pos)  # part of `take` that is document tokens
            if body > 0:
                buf[fill : fill + body] = arr[pos : pos + body]
            if body < take:  # the EOT fits in this chunk (it is always its last token)
                buf[fill + body] = eot_id
            if last_doc != doc_index:
                doc_ids.append(str(doc_id))
                last_doc = doc_index
            fill += take
            pos += take
            if fill == window:
                yield PackedSequence(buf.copy(), path, doc_ids, window)
                fill, doc_ids, last_doc = 0, [], -1

    if fill > 0:
        buf[fill:] = pad_id
        yield PackedSequence(buf.copy(), path, doc_ids, fill)


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
        raise ValueError("make_batch needs at least one sample, got none (empty_batch makes a 0-row batch)")
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

    # Padding is only ever the trailing run of pad_id (pack_leaf pads the tail
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


def empty_batch(seq_len: int, levels: int) -> dict[str, Tensor]:
    """A batch with 0 rows and the usual fields: a rank whose share of a step is empty still runs it."""
    rows = torch.zeros(0, seq_len, dtype=torch.int64)
    return {"tokens": rows, "labels": rows.clone(), "segments": rows.clone(),
            "paths": torch.zeros(0, levels, dtype=torch.int64), "index": torch.zeros(0, dtype=torch.int64)}
