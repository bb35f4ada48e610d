"""Owner placement's routing inside a group (hmtrain/data/loading/route.py) and `hmtrain info`'s model of its
traffic (hmtrain/memory/sizes.py, `_group_fetch`), checked against the routing itself."""
import numpy as np
import pytest

from hmtrain.data.loading.route import quotas, route_in_group
from hmtrain.memory.sizes import _chunks, _group_fetch, rank_footprint


def check_routing(home: np.ndarray, rank: np.ndarray, size: int) -> None:
    """Every rank runs its even share; a sequence runs away from its home only when the home is full of its
    own sequences, each earlier in the stream than the one sent away."""
    assert np.array_equal(np.bincount(rank, minlength=size), quotas(len(home), size))
    for s in np.flatnonzero(rank != home):
        h = home[s]
        runs = np.flatnonzero(rank == h)
        assert (home[runs] == h).all() and (runs < s).all(), (s, h, runs)


@pytest.mark.parametrize("seed", range(20))
def test_each_rank_runs_its_even_share_its_own_rows_first(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 6))
    nodes = int(rng.integers(size, 4 * size))
    node = rng.integers(0, nodes, size=int(rng.integers(0, 40)))
    home = _chunks(nodes, size)[node]
    rank = route_in_group(home, node, size)
    check_routing(home, rank, size)
    # the overflow in node order: one node's overflow on as few receivers as take it
    away = np.flatnonzero(rank != home)
    assert (np.diff(rank[away[np.argsort(node[away], kind="stable")]]) >= 0).all()


def test_a_rank_storing_nothing_runs_the_overflow_and_bad_homes_are_refused():
    home = np.array([0, 0, 0, 0, 1, 0])  # rank 2 stores nothing
    rank = route_in_group(home, home, 3)
    assert rank.tolist() == [0, 0, 1, 2, 1, 2]
    with pytest.raises(ValueError, match=r"home ranks must be in \[0, 3\)"):
        route_in_group(np.array([3]), np.array([0]), 3)


def simulated(nodes: int, count: int, n: int, size: int, trials: int = 3000) -> float:
    """The mean rows a rank of a routed group sends and receives per step, the routing run on uniform leaves."""
    rng = np.random.default_rng(0)
    deep = max(nodes, count)
    home, stored = _chunks(count, size), _chunks(nodes, size)
    total = 0
    for _ in range(trials):
        leaf = rng.integers(0, deep, n)
        routed, level = leaf // (deep // count), leaf // (deep // nodes)
        rank = route_in_group(home[routed], routed, size)
        for r in range(size):
            mine = level[rank == r]
            total += 2 * len(np.unique(mine[stored[mine] != r]))  # rows in, gradients out
    return total / trials / size


@pytest.mark.parametrize("nodes, count, n, size", [
    (16, 16, 64, 4),  # paper-1.4b on 64 ranks, level 2 (the routing level)
    (256, 16, 64, 4),  # ... level 3: the children of a rank's level-2 rows are its own
    (256, 256, 64, 32),  # on 512 ranks, level 3 (the routing level: level 2 has fewer nodes than ranks)
    (16, 256, 64, 32),  # ... level 2, above it
    (4, 16, 64, 4),  # a level above the routing one, one node per rank: each receiver of a rank's overflow needs it
    (16, 16, 128, 4),
    (6, 6, 6, 2), (12, 6, 6, 2),  # tests/dist's owner groups
])
def test_info_models_the_routed_traffic_within_ten_percent(nodes, count, n, size):
    model = _group_fetch(nodes, count, n, size, micro_batches=1)
    assert model == pytest.approx(simulated(nodes, count, n, size), rel=0.10)


def test_routing_halves_paper_1_4b_traffic_at_64_ranks():
    kw = dict(n_layers=24, params_per_unit=3 * 2048, branching=[16, 16, 16, 16], units=[768, 256, 16, 0],
              world_size=64, replicate_levels=1, generic=True, weight_bytes=2, micro_batch=4, global_batch=1024,
              group_size=4, placement="owner", fetch_per_step=True)
    routed, even = rank_footprint(**kw), rank_footprint(**kw, routed=False)
    assert routed.moved_owner < 0.55 * even.moved_owner
    # groups of one rank route nothing: every row is the rank's own
    alone = dict(kw, world_size=16, group_size=1)
    assert rank_footprint(**alone).moved_owner == rank_footprint(**alone, routed=False).moved_owner
