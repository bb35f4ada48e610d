"""Build a small prepared directory without documents: known sequences per leaf, every one tagged.

Sequence number s (in write order) has tokens[0] = 2 + s, so a test can tell which sequence
it got; the rest of its tokens are arbitrary non-special ids. `tokens_of` writes other sequences
instead (a test's own corpus), `manifest` overrides the manifest's entries (another tokenizer's ids).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from hmtrain.data.format.manifest import MANIFEST_VERSION, write_manifest
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.format.sequences import write_split_index
from hmtrain.data.format.shards import PackedSequence, ShardWriter
from hmtrain.util.files import record_files

EOT, PAD = 1, 0


def leaf_paths(branching: list[int]) -> list[tuple[int, ...]]:
    """Every leaf's path, in order."""
    paths = [()]
    for k in branching:
        paths = [p + (p[-1] * k + c if p else c,) for p in paths for c in range(k)]
    return paths


def make_prepared(root: Path, counts: dict[tuple[int, ...], int], *, branching: list[int], seq_len: int = 6,
                  shard_samples: int = 4, heldout: dict[tuple[int, ...], int] | None = None,
                  interleave: bool = False,
                  tokens_of: Optional[Callable[[str, tuple[int, ...], int], np.ndarray]] = None,
                  manifest: Optional[dict] = None) -> PreparedData:
    """Write `counts[leaf]` train sequences per leaf (and `heldout` ones); open the result.

    interleave=True writes leaves round-robin, so one shard holds several level-1 nodes.
    tokens_of(split, leaf, s): the seq_len + 1 tokens of the s-th sequence written (instead of the tags).
    """
    root = Path(root)
    splits = {}
    tag = 0
    for split, per_leaf in (("train", counts), ("heldout", heldout or {})):
        order = [leaf for leaf in sorted(per_leaf) for _ in range(per_leaf[leaf])]
        if interleave:
            queues = {leaf: per_leaf[leaf] for leaf in sorted(per_leaf)}
            order = []
            while any(queues.values()):
                for leaf in queues:
                    if queues[leaf]:
                        order.append(leaf)
                        queues[leaf] -= 1
        with ShardWriter(root, f"shards/{split}", max_samples=shard_samples) as writer:
            for leaf in order:
                tokens = (np.arange(seq_len + 1, dtype=np.int32) * 7 + tag) % 97 + 2
                tokens[0] = 2 + tag
                if tokens_of is not None:
                    tokens = np.asarray(tokens_of(split, leaf, tag), dtype=np.int32)
                writer.write(PackedSequence(tokens, leaf, [f"doc{tag}"], seq_len + 1))
                tag += 1
        splits[split] = write_split_index(root, split, writer.close(), branching=branching)
    sizes = [math.prod(branching[: i + 1]) for i in range(len(branching))]
    entries = {
        "version": MANIFEST_VERSION, "seq_len": seq_len, "branching": list(branching), "splits": splits,
        "node_tokens": [[0] * n for n in sizes], "node_documents": [[0] * n for n in sizes],
        "eot_id": EOT, "pad_id": PAD, "vocab_size": 100, "tokenizer": "tokenizer", "tree": "tree.pt",
        **(manifest or {}), "files": record_files(root),
    }
    write_manifest(root / "manifest.json", entries)
    return PreparedData.open(root, verify="checksums")
