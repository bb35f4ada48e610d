"""The routing tree: hierarchical k-means centroids and greedy descent.

Numbering (docs/design.md, "The memory, exactly"): level index i = 0..L-1 has
branching k_i and N_i = k_0 * ... * k_i nodes; node j at level i >= 1 has
parent j // k_i, so the children of parent p are p*k_i .. p*k_i + k_i - 1.
A path is one node id per level, consistent with parents. The tree is fitted
top-down on document embeddings and saved next to the prepared data; prompts
are routed later with the same embedder and this file.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from hmtrain.config import check_branching
from hmtrain.data.routing.kmeans import jitter_scale, kmeans, validate_kmeans_args
from hmtrain.util.files import atomic_write

_FORMAT = "hmtrain.tree"
_VERSION = 1
# Largest [rows, k, d] block of gathered child centroids held at once (elements).
_MAX_GATHER_ELEMS = 1 << 23


def route_level(x: Tensor, centroids: Tensor, sq_norms: Tensor, parents: Tensor, k: int) -> Tensor:
    """One step of greedy descent: for each row of `x`, the nearest (L2) of its parent's k children.

    Only the k children are compared, never the whole level. Ties go to the
    lowest child id. `sq_norms` = squared norms of `centroids`.
    """
    out = torch.empty_like(parents)
    offsets = torch.arange(k, device=x.device)
    rows = max(1, _MAX_GATHER_ELEMS // (k * x.shape[1]))
    for start in range(0, x.shape[0], rows):
        children = parents[start : start + rows, None] * k + offsets  # [b, k]
        dots = torch.bmm(centroids[children], x[start : start + rows, :, None]).squeeze(2)
        # ||x||^2 is the same for all candidates of a row, so it is left out.
        best = (sq_norms[children] - 2.0 * dots).argmin(1, keepdim=True)
        out[start : start + rows] = children.gather(1, best).squeeze(1)
    return out


@dataclass
class Tree:
    """Per-level centroids of a hierarchical k-means tree."""

    branching: tuple[int, ...]
    centroids: list[Tensor]  # level index i: [N_i, dim], float32

    def __post_init__(self) -> None:
        self.branching = check_branching(self.branching)
        if not isinstance(self.centroids, (list, tuple)) or len(self.centroids) != len(self.branching):
            got = len(self.centroids) if isinstance(self.centroids, (list, tuple)) else type(self.centroids).__name__
            raise ValueError(f"centroids must be a list with one tensor per level ({len(self.branching)}), got {got}")
        dim = None
        for i, c in enumerate(self.centroids):
            if not isinstance(c, Tensor) or c.dim() != 2 or not c.is_floating_point():
                desc = f"{tuple(c.shape)} {c.dtype}" if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"centroids[{i}] must be a 2-D float tensor, got {desc}")
            if c.shape[0] != self.num_nodes(i):
                raise ValueError(
                    f"centroids[{i}] has {c.shape[0]} rows but level {i} of branching {self.branching} "
                    f"has {self.num_nodes(i)} nodes"
                )
            dim = c.shape[1] if dim is None else dim
            if c.shape[1] != dim:
                raise ValueError(f"centroids[{i}] has dim {c.shape[1]} but centroids[0] has dim {dim}")
        self.centroids = [c.float().contiguous() for c in self.centroids]

    @property
    def dim(self) -> int:
        return self.centroids[0].shape[1]

    def num_levels(self) -> int:
        return len(self.branching)

    def num_nodes(self, level: int) -> int:
        if not 0 <= level < len(self.branching):
            raise ValueError(f"level index {level} is out of range [0, {len(self.branching)})")
        return math.prod(self.branching[: level + 1])

    def parent(self, level: int, node: Tensor | int) -> Tensor | int:
        """The parent (at level index `level - 1`) of `node` at level index `level` >= 1."""
        if not 1 <= level < len(self.branching):
            raise ValueError(f"parent needs a level index in [1, {len(self.branching)}), got {level}")
        n = self.num_nodes(level)
        bad = (node < 0) | (node >= n)
        if bool(bad.any() if isinstance(node, Tensor) else bad):
            raise ValueError(f"node {node} is out of range [0, {n}) at level index {level}")
        return node // self.branching[level]

    def route(self, emb: Tensor, batch_size: int = 65536) -> Tensor:
        """[n, L] int64 paths by greedy nearest-centroid descent, on `emb`'s device."""
        if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[1] != self.dim:
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(f"emb must be [n, {self.dim}] to match the tree, got {shape}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        x = emb.float()
        on_device = [c.to(x.device) for c in self.centroids]
        levels = [(c, c.pow(2).sum(1)) for c in on_device]
        paths = torch.empty(x.shape[0], len(self.branching), dtype=torch.int64, device=x.device)
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            node = torch.zeros(xb.shape[0], dtype=torch.int64, device=x.device)
            for i, (k, (c, c_sq)) in enumerate(zip(self.branching, levels)):
                node = route_level(xb, c, c_sq, node, k)
                paths[start : start + batch_size, i] = node
        return paths

    def check_paths(self, paths: Tensor) -> None:
        """Raise ValueError naming the first row/level whose node is out of range or not a child
        of the previous level's node."""
        L = len(self.branching)
        if not isinstance(paths, Tensor) or paths.dim() != 2 or paths.shape[1] != L:
            shape = tuple(paths.shape) if isinstance(paths, Tensor) else type(paths).__name__
            raise ValueError(f"paths must be [n, {L}] (one node per level), got {shape}")
        if paths.is_floating_point() or paths.is_complex() or paths.dtype == torch.bool:
            raise ValueError(f"paths must be an integer tensor, got {paths.dtype}")
        p = paths.long()
        out_of_range = torch.stack([(p[:, i] < 0) | (p[:, i] >= self.num_nodes(i)) for i in range(L)], 1)
        wrong_parent = torch.zeros_like(out_of_range)
        for i in range(1, L):
            wrong_parent[:, i] = torch.div(p[:, i], self.branching[i], rounding_mode="floor") != p[:, i - 1]
        bad = out_of_range | wrong_parent
        if not bool(bad.any()):
            return
        row = int(bad.any(1).nonzero()[0, 0])
        level = int(bad[row].nonzero()[0, 0])
        node = int(p[row, level])
        if out_of_range[row, level]:
            raise ValueError(
                f"paths row {row}, level {level}: node {node} is out of range [0, {self.num_nodes(level)})"
            )
        raise ValueError(
            f"paths row {row}, level {level}: node {node} has parent {node // self.branching[level]} "
            f"but the path has node {int(p[row, level - 1])} at level {level - 1}"
        )

    def save(self, path: str | Path) -> None:
        """torch.save plain tensors/lists, atomically: a crash never leaves a half-written tree."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "branching": list(self.branching),
            "centroids": [c.detach().cpu().contiguous() for c in self.centroids],
        }
        with atomic_write(path) as f:
            torch.save(state, f)

    @classmethod
    def load(cls, path: str | Path) -> "Tree":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tree file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated / foreign files
            raise ValueError(f"tree file {path} is corrupt or not a torch file: {e}") from e
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"tree file {path} is not an hmtrain tree (missing format tag {_FORMAT!r})")
        if state.get("version") != _VERSION:
            raise ValueError(f"tree file {path} has version {state.get('version')!r}, expected {_VERSION}")
        try:
            return cls(branching=tuple(state["branching"]), centroids=list(state["centroids"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tree file {path} is inconsistent: {e}") from e


def _seed(*parts: object) -> int:
    """A 63-bit seed from its parts, independent of the order nodes are visited in."""
    digest = hashlib.blake2b("/".join(map(str, ("hmtrain.tree",) + parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def fit_tree(
    emb: Tensor,
    branching: Sequence[int],
    *,
    steps: int = 20,
    subsample: int = 6400,
    balance: float = 1.5,
    seed: int = 0,
    progress: bool = True,
) -> Tree:
    """Fit the tree top-down on `emb` [n, d] (kept on its device).

    Level 0 is k-means on all points; at each next level, the children of a
    node are k-means on the points greedy descent routes to that node, with
    a generator seeded from (seed, level, node). Nodes holding <= k points are
    done in one vectorised pass: their children are their points, then copies
    (of the points, or of the node's own centroid when it holds none) with a
    tiny noise fixed by (seed, level, child id), so every node exists.
    """
    branching = check_branching(branching)
    validate_kmeans_args(steps, subsample, balance)
    if not isinstance(emb, Tensor) or emb.dim() != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"emb must be a non-empty 2-D [n, d] tensor, got {shape}")
    # in chunks: isfinite on the whole sample makes temporaries of its size
    if not emb.is_floating_point() or not all(bool(torch.isfinite(emb[s : s + 65536]).all())
                                              for s in range(0, emb.shape[0], 65536)):
        raise ValueError("emb must be floating point with finite values (NaN/inf found or integer dtype)")
    x = emb.float()
    n, d = x.shape
    scale = jitter_scale(x)
    parents = torch.zeros(n, dtype=torch.int64, device=x.device)  # level "-1": a single root
    parent_centroids = x.mean(0, keepdim=True)
    centroids: list[Tensor] = []
    total = sum(math.prod(branching[:i]) for i in range(len(branching)))
    with tqdm(total=total, desc="fit tree", unit="node", disable=not progress) as bar:
        for level, k in enumerate(branching):
            n_parents = parent_centroids.shape[0]
            counts = torch.bincount(parents, minlength=n_parents)
            starts = counts.cumsum(0) - counts
            order = torch.argsort(parents, stable=True)  # points grouped by node, in input order
            level_c = torch.empty(n_parents * k, d, device=x.device)

            small = (counts <= k).nonzero().squeeze(1)
            if small.numel():
                g = torch.Generator(device=x.device).manual_seed(_seed(seed, level, "copies"))
                noise = torch.rand(n_parents * k, d, generator=g, device=x.device) * 2.0 - 1.0
                cnt = counts[small, None]  # [s, 1]
                child = torch.arange(k, device=x.device)  # [k]
                ids = small[:, None] * k + child  # [s, k] global child ids
                src = order[(starts[small, None] + child % cnt.clamp(min=1)).clamp(max=n - 1)]
                base = torch.where((cnt > 0)[..., None], x[src], parent_centroids[small, None, :])
                is_copy = (child >= cnt)[..., None]
                level_c[ids] = base + is_copy * noise[ids] * scale
                bar.update(small.numel())

            heavy = (counts > k).nonzero().squeeze(1).tolist()
            starts_l, counts_l = starts.tolist(), counts.tolist()
            for p in heavy:
                g = torch.Generator(device=x.device).manual_seed(_seed(seed, level, p))
                # a node holding every point (the root's children) uses x itself: no copy of the sample
                pts = x if counts_l[p] == n else x[order[starts_l[p] : starts_l[p] + counts_l[p]]]
                level_c[p * k : (p + 1) * k] = kmeans(
                    pts, k, steps=steps, subsample=subsample, balance=balance, generator=g
                )
                bar.update(1)

            centroids.append(level_c)
            if level + 1 < len(branching):
                parents = route_level(x, level_c, level_c.pow(2).sum(1), parents, k)
                parent_centroids = level_c
    return Tree(branching=branching, centroids=centroids)
