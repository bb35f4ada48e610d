"""Owner placement's groups (hmtrain/parallel/placement.py) and the rows they store (hmtrain/memory/layout.py):
balanced by tokens and by rows, deterministic, one rank per group while W <= k_1 (the old one-owner placement)."""
import numpy as np
import pytest

from hmtrain.memory.layout import by_subtree
from hmtrain.parallel.placement import assign_groups, num_groups


def one_owner_per_subtree(tokens, world):
    """The placement before groups (W <= k_1 only): longest-processing-time greedy by tokens, no row cap."""
    owner, load = np.empty(len(tokens), np.int64), np.zeros(world, np.int64)
    for s in np.argsort(-np.asarray(tokens), kind="stable"):
        owner[s] = int(np.argmin(load))
        load[owner[s]] += tokens[s]
    return owner


@pytest.mark.parametrize("subtrees, world, groups", [(16, 8, 8), (16, 16, 16), (16, 64, 16), (16, 512, 16),
                                                      (16, 24, 12), (2, 4, 2), (2, 3, 1), (4, 6, 3), (1, 5, 1)])
def test_groups_are_the_largest_divisor_of_the_world_up_to_k1(subtrees, world, groups):
    assert num_groups(subtrees, world) == groups
    placed = assign_groups(np.arange(subtrees) + 1, world)
    assert placed.group_size * placed.num_groups == world and placed.num_groups == groups


@pytest.mark.parametrize("tokens, world", [([5, 1, 3, 2], 2), ([5, 1, 3, 2], 3), ([5, 1, 3, 2], 4),
                                           ([7, 7, 7, 7, 7, 7], 3), (list(range(16, 0, -1)), 16),
                                           (list(range(3, 35, 2)), 8), ([100, 101, 99, 98, 102, 97, 100, 103], 4)])
def test_up_to_k1_ranks_it_is_one_owner_per_subtree_as_before(tokens, world):
    """Wherever the old placement kept every rank within one subtree of the others (always, for near-equal
    token counts, which the tree's fitting aims at), the groups are exactly its owners."""
    before = one_owner_per_subtree(tokens, world)
    counts = np.bincount(before, minlength=world)
    assert counts.max() - counts.min() <= 1  # the case this test is about
    placed = assign_groups(tokens, world)
    assert placed.group_size == 1  # a group is one rank
    np.testing.assert_array_equal(placed.group_of_subtree, before)


@pytest.mark.parametrize("tokens, world, counts_before", [([10, 1, 1, 1], 2, [1, 3]),
                                                          ([4, 9, 2, 9, 4, 1, 1, 6], 4, [1, 1, 3, 3])])
def test_balanced_by_rows_where_tokens_alone_would_pile_subtrees_on_one_rank(tokens, world, counts_before):
    """The one change up to k_1 ranks: tokens alone put several times the rows (memory) on one rank."""
    assert sorted(np.bincount(one_owner_per_subtree(tokens, world))) == counts_before
    placed = assign_groups(tokens, world)
    assert np.bincount(placed.group_of_subtree).tolist() == [len(tokens) // world] * world
    if world == 2:
        assert placed.group_of_subtree.tolist() == [0, 1, 1, 0]  # the largest with the smallest


@pytest.mark.parametrize("subtrees, world", [(16, 64), (16, 24), (16, 512), (5, 6), (16, 32)])
def test_past_k1_groups_balance_tokens_and_rows_deterministically(subtrees, world):
    tokens = np.random.default_rng(subtrees * world).integers(1_000, 100_000, size=subtrees)
    placed = assign_groups(tokens, world)
    again = assign_groups(tokens.tolist(), world)
    np.testing.assert_array_equal(placed.group_of_subtree, again.group_of_subtree)
    groups = placed.num_groups
    per_group = np.bincount(placed.group_of_subtree, minlength=groups)
    assert per_group.min() >= subtrees // groups and per_group.max() <= -(-subtrees // groups)  # rows
    load = np.bincount(placed.group_of_subtree, weights=tokens, minlength=groups)
    # LPT's bound over the subtrees a group may take: within the largest subtree of the mean
    assert load.max() - load.mean() <= tokens.max()


def test_a_groups_rows_are_cut_among_its_ranks_and_stay_in_the_group():
    # 2 subtrees, 4 ranks: groups of 2; a level of 12 rows has 6 per subtree
    lay = by_subtree(12, 2, np.array([1, 0]), world_size=4, rank=0, group_size=2)
    assert lay.owner.tolist() == [2, 2, 2, 3, 3, 3, 0, 0, 0, 1, 1, 1]  # subtree 0 in group 1 (ranks 2, 3)
    assert lay.local.tolist() == [0, 1, 2] * 4
    assert lay.local_rows.tolist() == [6, 7, 8] and lay.num_local == 3
    # fewer rows than ranks in the group: the first ranks hold one row each
    top = by_subtree(2, 2, np.array([1, 0]), world_size=4, rank=3, group_size=2)
    assert top.owner.tolist() == [2, 0] and top.num_local == 0
    # groups of one rank: each subtree's rows whole on its owner, as before groups
    one = by_subtree(12, 4, np.array([1, 0, 1, 2]), world_size=3, rank=1)
    assert one.owner.tolist() == [1] * 3 + [0] * 3 + [1] * 3 + [2] * 3
    assert one.local.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError, match="group_size"):
        by_subtree(12, 2, np.array([1, 0]), world_size=4, rank=0, group_size=3)
    with pytest.raises(ValueError, match="group in"):
        by_subtree(12, 2, np.array([2, 0]), world_size=4, rank=0, group_size=2)
