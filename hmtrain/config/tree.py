"""`tree`: hierarchical k-means over document embeddings (paper: 16-way, 4 levels), and the one
branching rule every tree, manifest and memory bank is checked by."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

from hmtrain.config.checks import ConfigError, require

# a node with one child would only repeat its parent's memory one level deeper
MIN_CHILDREN = 2


def check_branching(branching: Sequence[int], name: str = "branching") -> tuple[int, ...]:
    """Branching factors as a tuple of ints >= MIN_CHILDREN; ValueError naming `name` and the bad entry."""
    try:
        values = tuple(branching)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints >= {MIN_CHILDREN}, got {branching!r}") from None
    if not values:
        raise ValueError(f"{name} is empty: the tree needs at least one level")
    for i, k in enumerate(values):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(f"{name}[{i}] must be an int, got {k!r} ({type(k).__name__})")
        if k < MIN_CHILDREN:
            raise ValueError(f"{name}[{i}] must be >= {MIN_CHILDREN}, got {k}")
    return tuple(int(k) for k in values)


@dataclass
class TreeConfig:
    # children per node at each level of the hierarchical k-means tree, e.g. [16,16,16,16]
    branching: list[int] = field(default_factory=lambda: [16, 16, 16, 16])
    # k-means EM iterations per node (each on a fresh subsample)
    em_steps: int = 20
    # document embeddings sampled per EM iteration of a node
    subsample: int = 6400
    # a cluster may hold at most this many times its fair share (1/k) of its parent's documents
    balance: float = 1.5
    # training documents sampled to fit the tree (all are routed afterwards); 0 = all. Their
    # embeddings are held in memory (fit_sample x 384 floats): state a size for a large corpus
    fit_sample: int = 0
    # seed of the tree's k-means++ draws and subsamples (>= 0)
    seed: int = 0

    def validate(self) -> None:
        try:
            check_branching(self.branching)
        except ValueError as exc:
            raise ConfigError(f"config key 'tree.branching': {exc}") from None
        require(self.balance > 1.0, "tree.balance", f"must be > 1, got {self.balance}")
        require(self.seed >= 0, "tree.seed", f"must be >= 0, got {self.seed}")
        require(self.em_steps >= 0, "tree.em_steps", f"must be >= 0, got {self.em_steps}")
        require(self.subsample > 0, "tree.subsample", f"must be positive, got {self.subsample}")
        require(self.fit_sample >= 0, "tree.fit_sample", f"must be >= 0 (0 = all documents), got {self.fit_sample}")
