"""Balanced k-means for one node of the routing tree.

k-means++ seeding, then EM where every step draws a fresh random subsample of
the node's points, and the paper's balance rule (Pouransari et al. 2025,
arXiv 2510.02375): a cluster holding more than `balance / k` of a step's
assignments is split in two by replacing the smallest cluster's centroid with
a perturbed copy of the oversized one. All randomness comes from one
`torch.Generator`, so a seed fixes the result; draws are made on the
generator's device, so a CPU generator can drive CUDA data and vice versa.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest [rows, k] distance matrix materialised at once (elements): keeps
# assign() within a few hundred MB whatever n and k are.
_MAX_DIST_ELEMS = 1 << 24
# Half-distance between the two centroids of a split, relative to the
# oversized cluster's RMS radius. The symmetric pair always divides the
# cluster by the hyperplane through its centroid; a small step keeps
# neighbouring clusters' points where they were.
_SPLIT_STEP = 0.1
# Size of the perturbation that makes copied centroids distinct, relative to
# the data's RMS norm.
_JITTER = 1e-3


def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D [n, d] tensor, got {shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def validate_kmeans_args(steps: int, subsample: int, balance: float) -> None:
    """Raise ValueError naming the first bad k-means setting."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
        raise ValueError(f"subsample must be an int >= 1, got {subsample!r}")
    if not isinstance(balance, (int, float)) or math.isnan(balance) or balance < 1.0:
        raise ValueError(f"balance must be a number >= 1 (1.5 in the paper), got {balance!r}")


def jitter_scale(x: Tensor, chunk: int = 65536) -> float:
    """Per-coordinate amplitude of the tiny noise that makes copied centroids distinct."""
    # in float64, a chunk of rows at a time: a float64 copy of a million-row sample would be 3 GB
    total = sum(x[s : s + chunk].double().pow(2).sum().item() for s in range(0, x.shape[0], chunk))
    rms = math.sqrt(total / x.shape[0])
    return _JITTER * max(rms, 1e-6) / math.sqrt(x.shape[1])


def _uniform(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _subsample(x: Tensor, m: int, generator: torch.Generator) -> Tensor:
    n = x.shape[0]
    if m >= n:
        return x
    perm = torch.randperm(n, generator=generator, device=generator.device)[:m]
    return x[perm.to(x.device)]


def _sample_index(weights: Tensor, generator: torch.Generator) -> Tensor:
    """One index drawn with probability proportional to `weights` (uniform when all are zero)."""
    w = weights.double()
    w = torch.where(w.sum() > 0, w, torch.ones_like(w))
    cdf = w.cumsum(0)
    u = _uniform(generator, (1,), w.device).double() * cdf[-1]
    # right=True skips zero-weight entries: the first cdf value above u has weight > 0.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=w.numel() - 1)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: [k, d] rows of `x`, each drawn with probability ~ squared distance
    to the nearest row already chosen. Repeats rows only when `x` has fewer than k distinct ones."""
    _check_x(x)
    _check_k(k)
    centroids = x.new_empty(k, x.shape[1])
    first = _sample_index(torch.ones(x.shape[0], device=x.device), generator)
    centroids[0] = x[first].squeeze(0)
    d2 = (x - centroids[0]).pow(2).sum(1)
    for i in range(1, k):
        centroids[i] = x[_sample_index(d2, generator)].squeeze(0)
        d2 = torch.minimum(d2, (x - centroids[i]).pow(2).sum(1))
    return centroids


def assign(x: Tensor, centroids: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Nearest centroid per row by squared L2: (ids int64 [n], sq_dist [n]).

    Rows are processed `chunk` at a time (fewer when k is large) so the
    [rows, k] distance matrix stays small. Ties go to the lowest centroid id.
    """
    _check_x(x)
    _check_x(centroids, "centroids")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dim {centroids.shape[1]} but x has dim {x.shape[1]}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    centroids = centroids.to(device=x.device, dtype=x.dtype)
    n, k = x.shape[0], centroids.shape[0]
    rows = max(1, min(chunk, _MAX_DIST_ELEMS // k))
    c_sq = centroids.pow(2).sum(1)
    ids = torch.empty(n, dtype=torch.int64, device=x.device)
    sq_dist = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        xb = x[start : start + rows]
        # ||x||^2 - 2 x.c + ||c||^2: one matmul instead of an [rows, k, d] difference tensor.
        dist = torch.addmm(xb.pow(2).sum(1, keepdim=True) + c_sq, xb, centroids.T, alpha=-2.0)
        arg = dist.argmin(1)
        ids[start : start + rows] = arg
        sq_dist[start : start + rows] = dist.gather(1, arg[:, None]).squeeze(1).clamp_min(0.0)
    return ids, sq_dist


def _split_oversized(
    sub: Tensor, centroids: Tensor, ids: Tensor, d2: Tensor, limit: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The balance rule, in place on `centroids`: every cluster holding more than `limit`
    points of `sub` is split with one of the smallest clusters, whose centroid becomes a
    perturbed copy of it. Returns the new assignment of `sub`."""
    k = centroids.shape[0]
    counts = torch.bincount(ids, minlength=k)
    n_big = int((counts > limit).sum())
    if n_big == 0:
        return ids, d2
    order = counts.argsort(descending=True, stable=True)
    n_pairs = min(n_big, k - n_big)  # the smallest clusters are never oversized
    bigs, smalls = order[:n_pairs], order.flip(0)[:n_pairs]
    # Cut along the direction to a random member (one not on the centroid), so the split
    # follows the data; the symmetric pair divides the cluster by the hyperplane through it.
    members = ids[None, :] == bigs[:, None]  # [pairs, m]
    eligible = members & (d2[None, :] > 0)
    keys = _uniform(generator, (sub.shape[0],), sub.device)
    picks = torch.where(eligible, keys, -1.0).argmax(1)
    valid = eligible.any(1)  # a cluster sitting exactly on its points cannot be divided
    # masked sums rather than weighted bincount, whose float atomics are not deterministic on CUDA
    radius = ((members * d2).sum(1) / members.sum(1)).sqrt()
    direction = sub[picks] - centroids[bigs]
    scale = _SPLIT_STEP * radius / direction.norm(dim=1).clamp_min(torch.finfo(sub.dtype).tiny)
    step = direction * scale[:, None]
    bigs, smalls, step = bigs[valid], smalls[valid], step[valid]
    if bigs.numel() == 0:
        return ids, d2
    centre = centroids[bigs]
    centroids[smalls] = centre + step
    centroids[bigs] = centre - step
    return assign(sub, centroids)


def _update(sub: Tensor, centroids: Tensor, ids: Tensor, d2: Tensor) -> Tensor:
    """M-step: cluster means; an empty cluster is re-seeded at the worst-served point."""
    k = centroids.shape[0]
    counts = torch.bincount(ids, minlength=k)
    # One-hot matmul rather than index_add_: deterministic on CUDA too.
    sums = F.one_hot(ids, k).to(sub.dtype).T @ sub
    new = sums / counts.clamp(min=1).unsqueeze(1).to(sub.dtype)
    empty = counts == 0
    n_empty = int(empty.sum())
    if n_empty:
        far = d2.topk(n_empty).indices
        new[empty] = sub[far]
    return new


def _copies(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k centroids for n <= k points: the points themselves (SSE 0), then jittered copies."""
    n, d = x.shape
    centroids = x[torch.arange(k, device=x.device) % n].clone()
    if k > n:
        noise = _uniform(generator, (k - n, d), x.device).to(x.dtype) * 2.0 - 1.0
        centroids[n:] += noise * jitter_scale(x)
    return centroids


def kmeans(
    x: Tensor,
    k: int,
    *,
    steps: int = 20,
    subsample: int = 6400,
    balance: float = 1.5,
    generator: torch.Generator,
) -> Tensor:
    """Balanced k-means: [k, d] centroids of the rows of `x`.

    k-means++ on a subsample, then `steps` EM steps, each on a fresh random
    subsample of `subsample` rows (all of `x` when it is smaller; at least k
    rows so every centroid can own one). In each step every oversized cluster
    is split with one of the smallest before the M-step. Splits keep moving
    points between clusters, so EM need not end on a balanced partition:
    the result is the iterate with the lowest subsample SSE among those whose
    own assignment met the rule (the last one if none did). With n <= k the
    points themselves plus jittered copies are returned, so deep tree levels
    on small data still route.
    """
    _check_x(x)
    _check_k(k)
    validate_kmeans_args(steps, subsample, balance)
    n = x.shape[0]
    if n <= k:
        return _copies(x, k, generator)
    m = min(n, max(subsample, k))
    limit = balance * m / k
    centroids = kmeans_plus_plus(_subsample(x, m, generator), k, generator)
    best, best_sse = None, math.inf
    for step in range(steps + 1):
        sub = _subsample(x, m, generator)
        ids, d2 = assign(sub, centroids)
        if torch.bincount(ids, minlength=k).max().item() <= limit:
            sse = d2.mean().item()
            if sse < best_sse:
                best, best_sse = centroids.clone(), sse
        if step == steps:
            break  # the extra pass only scores the last M-step
        ids, d2 = _split_oversized(sub, centroids, ids, d2, limit, generator)
        centroids = _update(sub, centroids, ids, d2)
    return centroids if best is None else best
