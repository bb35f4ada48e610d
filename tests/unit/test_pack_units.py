"""Stage 3's plan: pack units are leaf ranges cut from the token counts alone."""
from __future__ import annotations

import numpy as np
import pytest

from hmtrain.data.prepare import pack


def test_units_cover_every_leaf_with_tokens_once_in_order_without_splitting_one():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 400, size=(2, 64)) * (rng.random((2, 64)) < 0.7)
    units = pack.plan_units(tokens, seq_len=7, shard_samples=2)  # target 16 shards x 2 x 8 = 256 tokens
    for code, split in enumerate(("train", "heldout")):
        mine = [u for u in units if u["split"] == split]
        assert [u["unit"] for u in mine] == list(range(len(mine)))
        assert all(a["leaf_stop"] <= b["leaf_start"] for a, b in zip(mine, mine[1:]))
        covered = sorted(leaf for u in mine for leaf in range(u["leaf_start"], u["leaf_stop"]) if tokens[code, leaf])
        assert covered == np.flatnonzero(tokens[code]).tolist()
        for u in mine:
            assert u["tokens"] == tokens[code, u["leaf_start"]:u["leaf_stop"]].sum()
            # a unit closes on the first leaf that brings it to the target, so without it it was below
            assert u["tokens"] - tokens[code, u["leaf_stop"] - 1] < 256
        assert all(u["tokens"] >= 256 for u in mine[:-1])
    assert pack.plan_units(tokens, seq_len=7, shard_samples=2) == units


def test_a_large_corpus_gets_at_most_max_units_per_split(monkeypatch):
    monkeypatch.setattr(pack, "MAX_UNITS", 4)
    tokens = np.full((2, 100), 1000)
    units = pack.plan_units(tokens, seq_len=7, shard_samples=2)
    assert len([u for u in units if u["split"] == "train"]) == 4


@pytest.mark.parametrize("branching", [[4], [2, 3], [3, 2, 4]])
def test_leaf_path_is_the_chain_of_parents(branching):
    from tests.unit.prepared_helper import leaf_paths

    for leaf, path in enumerate(leaf_paths(branching)):
        assert pack.leaf_path(leaf, branching) == path
