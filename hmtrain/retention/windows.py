"""Windows of tokens for the retention probe: cut from prepared sequences, padding moved to the left so the
last position is a real token, and turned into vectors by a frozen encoder."""
from __future__ import annotations

import numpy as np
import torch

from hmtrain.data.format.prepared import PreparedData
from hmtrain.retention.encoders import Encoder


def left_pad_windows(tokens: np.ndarray, n_ctx: int, pad_id: int) -> np.ndarray:
    """[B, T] sequences -> [W, n_ctx] windows (T cut into consecutive windows, the tail dropped), each with
    its padding moved to the front; windows holding no real token are dropped."""
    B, T = tokens.shape
    if T < n_ctx:
        raise ValueError(f"retention.n_ctx {n_ctx} is longer than the prepared sequences ({T} tokens)")
    windows = tokens[:, : (T // n_ctx) * n_ctx].reshape(-1, n_ctx)
    real = windows != pad_id
    order = np.argsort(real, axis=1, kind="stable")  # padding first, real tokens after, each in order
    shifted = np.take_along_axis(windows, order, axis=1)
    return shifted[real.any(axis=1)]


def sample_windows(data: PreparedData, split: str, n_ctx: int, limit: int, seed: int) -> torch.Tensor:
    """Up to `limit` (0: all) windows of one split, from a seeded random choice of its sequences."""
    sequences = data.sequences(split)
    per_sequence = max(1, data.manifest["seq_len"] // n_ctx)
    rng = np.random.default_rng(seed)
    ids = rng.permutation(len(sequences))
    if limit:
        ids = np.sort(ids[: -(-limit // per_sequence) + 1])
    pad_id = int(data.manifest["pad_id"])
    windows = left_pad_windows(sequences.tokens(ids)[:, :-1].astype(np.int64), n_ctx, pad_id)
    windows = windows[rng.permutation(len(windows))]
    if limit:
        windows = windows[:limit]
    if len(windows) == 0:
        raise ValueError(f"{data.root}: split {split!r} has no window of {n_ctx} tokens with a real token")
    return torch.from_numpy(np.ascontiguousarray(windows))


def encode_all(encoder: Encoder, windows: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    parts = [encoder.encode(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
    vectors = torch.cat(parts).float()
    if vectors.shape != (len(windows), encoder.dim) or not torch.isfinite(vectors).all():
        raise RuntimeError(f"encoder {encoder.label}: expected finite vectors of shape "
                           f"{(len(windows), encoder.dim)}, got {tuple(vectors.shape)}")
    return vectors


def window_vectors(encoder: Encoder, token_lists: list[list[int]], n_ctx: int, pad_id: int) -> torch.Tensor:
    """One vector per token list: the mean over its consecutive n_ctx windows (left-padded)."""
    rows, owner = [], []
    for i, tokens in enumerate(token_lists):
        tokens = tokens or [pad_id]
        padded = np.full(-(-len(tokens) // n_ctx) * n_ctx, pad_id, dtype=np.int64)
        padded[:len(tokens)] = tokens
        windows = left_pad_windows(padded[None], n_ctx, pad_id)
        if len(windows) == 0:
            windows = np.full((1, n_ctx), pad_id, dtype=np.int64)
        rows.append(windows)
        owner += [i] * len(windows)
    vectors = encode_all(encoder, torch.from_numpy(np.concatenate(rows)))
    owner_t = torch.tensor(owner)
    sums = torch.zeros(len(token_lists), vectors.shape[1]).index_add_(0, owner_t, vectors)
    return sums / torch.bincount(owner_t, minlength=len(token_lists)).clamp(min=1)[:, None].float()
