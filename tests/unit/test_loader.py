"""StepLoader: a global shuffle (batch mix), exact resume on any world size, placements, workers, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hmtrain.data.loading.loader import StepLoader, sequential_batches
from tests.unit.prepared_helper import leaf_paths, make_prepared

pytestmark = pytest.mark.timeout(120)  # a position bug shows up as an endless loop

SEQ_LEN = 6
BRANCHING = [3, 2]
# Sequences per leaf: level-1 nodes hold 9, 9 and 4 sequences; 22 in all.
COUNTS = {(0, 0): 5, (0, 1): 4, (1, 2): 6, (1, 3): 3, (2, 4): 2, (2, 5): 2}
TOTAL = sum(COUNTS.values())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"), COUNTS, branching=BRANCHING, seq_len=SEQ_LEN,
                         heldout={(0, 1): 3, (2, 5): 2}, interleave=True)


def _loader(data, **kw) -> StepLoader:
    args = dict(global_batch=6, micro_batches=1, seed=3)
    args.update(kw)
    return StepLoader(data, "train", **args)


def _take(loader: StepLoader, n: int) -> list[tuple[list[dict[str, torch.Tensor]], dict]]:
    out = []
    for item in loader:
        out.append(item)
        if len(out) == n:
            break
    return out


def _step_ids(micro: list[dict[str, torch.Tensor]]) -> list[int]:
    return [i for batch in micro for i in batch["index"].tolist()]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_batch_fields_match_the_sequences_they_name(data) -> None:
    micro, state = next(iter(_loader(data, micro_batches=2)))
    sequences = data.sequences("train")
    for batch in micro:
        assert set(batch) == {"tokens", "labels", "segments", "paths", "index"}
        assert batch["tokens"].shape == batch["labels"].shape == batch["segments"].shape == (3, SEQ_LEN)
        assert batch["paths"].shape == (3, 2) and batch["index"].shape == (3,)
        assert all(v.dtype == torch.int64 for v in batch.values())
        ids = batch["index"].numpy()
        assert np.array_equal(batch["tokens"].numpy(), sequences.tokens(ids)[:, :-1])
        assert np.array_equal(batch["paths"].numpy(), sequences.paths(ids))
        # path[1] is a child of path[0]: the paths came from the index, not made up.
        assert torch.equal(batch["paths"][:, 1] // 2, batch["paths"][:, 0])
    json.dumps(state)  # plain JSON-able values


def test_deterministic_for_a_seed(data) -> None:
    first = [_step_ids(m) for m, _ in _take(_loader(data), 10)]
    assert first == [_step_ids(m) for m, _ in _take(_loader(data), 10)]
    assert first != [_step_ids(m) for m, _ in _take(_loader(data, seed=4), 10)]


def test_epochs_are_permutations_crossed_seamlessly(data) -> None:
    # 5 steps of 7 = 35 ids: epoch 0 and 13 ids of epoch 1, the boundary inside step 4.
    ids = [i for m, _ in _take(_loader(data, global_batch=7), 10) for i in _step_ids(m)]
    epochs = [ids[e * TOTAL:(e + 1) * TOTAL] for e in range(3)]
    assert all(sorted(e) == list(range(TOTAL)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(TOTAL))


def test_a_batch_is_a_uniform_sample_of_level1_nodes(tmp_path: Path) -> None:
    """The issue's 4x4 tree, batches of 16: a batch's level-1 mix follows the nodes' sequence counts."""
    rng = np.random.default_rng(0)
    counts = {leaf: int(rng.integers(2, 30)) for leaf in leaf_paths([4, 4])}
    data = make_prepared(tmp_path, counts, branching=[4, 4], seq_len=4, shard_samples=8)
    per_node = np.bincount([leaf[0] for leaf in counts for _ in range(counts[leaf])], minlength=4)
    expected = 16 * per_node / per_node.sum()
    observed = np.stack([np.bincount(m[0]["paths"][:, 0].numpy(), minlength=4)
                         for m, _ in _take(StepLoader(data, "train", global_batch=16, micro_batches=1, seed=0), 60)])
    # Pearson's statistic over all batches ~ chi-square with 60 * 3 = 180 degrees of freedom under a
    # uniform sample (slightly less: draws within an epoch are without replacement). 244.4 is its
    # 99.9% quantile (scipy.stats.chi2.ppf(0.999, 180)). The shard-by-shard reading that this loader
    # replaced scores over 1,000 here, id order 2,400: most of their batches hold one level-1 node.
    statistic = float(((observed - expected) ** 2 / expected).sum())
    assert statistic < 244.4, statistic
    assert (np.count_nonzero(observed, axis=1) == 1).sum() == 0  # P(one node) ~ 1e-8 per batch


@pytest.mark.parametrize("save_after", [1, 3, 4, 6])  # steps of 5: step 5 crosses the 22-id epoch
def test_exact_resume(data, save_after: int) -> None:
    run = _take(_loader(data, global_batch=4, micro_batches=2), 9)
    state = json.loads(json.dumps(run[save_after - 1][1]))  # as stored in a checkpoint
    resumed = _loader(data, global_batch=4, micro_batches=2)
    resumed.load_state_dict(state)
    rest = _take(resumed, 9 - save_after)
    for (a, sa), (b, sb) in zip(run[save_after:], rest, strict=True):
        _same(a, b)
        assert sa == sb


def test_state_tracks_the_last_yielded_step(data) -> None:
    loader = _loader(data)
    it = iter(loader)
    _, state = next(it)
    assert loader.state_dict() == state and (state["epoch"], state["position"]) == (0, 6)
    for _ in range(3):
        _, state = next(it)
    assert (state["epoch"], state["position"]) == (1, 2)  # 24 ids into a 22-id epoch


def test_resume_on_another_world_size(data) -> None:
    """1 rank for 2 steps, 2 ranks for 3, 3 ranks for 3: every step holds the 1-rank run's ids, in order."""
    kw = dict(global_batch=12, micro_batches=2)
    reference = [_step_ids(m) for m, _ in _take(_loader(data, **kw), 8)]
    got: list[list[int]] = []
    state = None
    for world_size, steps in ((1, 2), (2, 3), (3, 3)):
        per_rank = []
        for rank in range(world_size):
            loader = _loader(data, world_size=world_size, rank=rank, **kw)
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
            per_rank.append(_take(loader, steps))
        states = {json.dumps(run[-1][1], sort_keys=True) for run in per_rank}
        assert len(states) == 1  # every rank holds the same, global state
        state = per_rank[0][-1][1]
        for step in range(steps):
            # micro-batch k of rank r is chunk k * world_size + r of the step
            chunks = [per_rank[r][step][0][k] for k in range(2) for r in range(world_size)]
            assert {c["index"].numel() for c in chunks} == {12 // (2 * world_size)}
            got.append([i for c in chunks for i in c["index"].tolist()])
    assert got == reference


def test_state_is_independent_of_placement_and_workers(data) -> None:
    states = [_take(_loader(data, global_batch=12, micro_batches=m, world_size=w, rank=w - 1,
                            num_workers=n), 3)[-1][1] for m, w, n in ((1, 1, 0), (2, 3, 0), (6, 2, 0), (3, 1, 2))]
    assert all(s == states[0] for s in states)


@pytest.mark.parametrize("owner, global_batch, micro_batches, world_size, group_size", [
    ([0, 1, 0], 6, 3, 2, 1),  # rank 1 owns level-1 node 1 alone; micro-batches of 1
    ([0, 1, 0], 12, 2, 2, 1),  # micro-batches of 3
    ([2, 0, 1], 12, 2, 3, 1),  # one node per rank; micro-batches of 2
    ([0, 1, 0], 8, 1, 4, 2),  # more ranks than level-1 nodes: 2 groups of 2 ranks; micro-batches of 2
    ([2, 0, 1], 6, 1, 6, 2),  # 3 groups of 2 ranks; micro-batches of 1
])
def test_owner_placement_gives_every_micro_batch_one_shape(data, owner, global_batch, micro_batches,
                                                           world_size, group_size) -> None:
    """Each group gets the sequences of its subtrees, cut among its ranks in stream order, in micro-batches of
    exactly global_batch / (world_size x micro_batches) rows, padded, and as many as the step's busiest rank
    needs: compiled attention sees one shape, and the ranks run the same number of micro-batches."""
    size = global_batch // (world_size * micro_batches)
    kw = dict(global_batch=global_batch, micro_batches=micro_batches, world_size=world_size, owner_of_subtree=owner,
              group_size=group_size)
    runs = [_take(_loader(data, rank=r, **kw), 8) for r in range(world_size)]
    reference = [_step_ids(m) for m, _ in _take(_loader(data, global_batch=global_batch, micro_batches=1), 8)]
    level1 = data.sequences("train").level1
    padding_rows, counts = 0, set()
    for step, ids in enumerate(reference):
        groups = [[i for i in ids if owner[level1([i])[0]] == g] for g in range(world_size // group_size)]
        owned = [np.array_split(np.asarray(groups[rank // group_size], dtype=np.int64), group_size)
                 [rank % group_size].tolist() for rank in range(world_size)]
        assert sorted(sum(owned, [])) == sorted(ids)  # every sequence on exactly one rank
        busiest = max(len(o) for o in owned)
        for rank in range(world_size):
            micro = runs[rank][step][0]
            assert len(micro) == -(-busiest // size) >= micro_batches  # the same on every rank
            counts.add(len(micro))
            for batch in micro:
                assert {k: tuple(v.shape) for k, v in batch.items()} == {
                    "tokens": (size, SEQ_LEN), "labels": (size, SEQ_LEN), "segments": (size, SEQ_LEN),
                    "paths": (size, 2), "index": (size,)}
                real = int((batch["index"] >= 0).sum())
                assert (batch["index"][real:] == -1).all()  # padding rows come last ...
                assert (batch["labels"][real:] == -100).all()  # ... and train nothing
                padding_rows += size - real
            mine = [i for i in _step_ids(micro) if i >= 0]
            assert mine == owned[rank]  # owned ids, stream order
    assert padding_rows > 0 and len(counts) > 1  # padding and a varying micro-batch count were exercised


def test_subtree_restriction(data) -> None:
    sequences = data.sequences("train")
    wanted = [i for i in range(TOTAL) if sequences.level1([i])[0] in (0, 2)]
    loader = _loader(data, subtrees=[2, 0], global_batch=13)
    ids = [i for m, _ in _take(loader, 1) for i in _step_ids(m)]
    assert sorted(ids) == wanted and ids != wanted  # one epoch of the 13 sequences of nodes 0 and 2
    state = loader.state_dict()
    assert state["sequences"] == 13 and state["subtrees"] == [2, 0] and (state["epoch"], state["position"]) == (1, 0)
    with pytest.raises(ValueError, match="subtrees"):
        _loader(data).load_state_dict(state)


def test_workers_give_identical_batches_and_states(data) -> None:
    kw = dict(global_batch=6, micro_batches=2, world_size=1)
    plain = _take(_loader(data, **kw), 7)
    for (a, sa), (b, sb) in zip(plain, _take(_loader(data, num_workers=2, **kw), 7), strict=True):
        _same(a, b)
        assert sa == sb
    resumed = _loader(data, num_workers=2, **kw)
    resumed.load_state_dict(plain[2][1])
    for (a, _), (b, _) in zip(plain[3:], _take(resumed, 4), strict=True):
        _same(a, b)


def test_one_pass_in_id_order(data) -> None:
    loader = _loader(data, shuffle=False, infinite=False, global_batch=8, micro_batches=2)
    run = list(loader)
    assert [_step_ids(m) for m, _ in run] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 22))]
    assert [b["index"].numel() for b in run[-1][0]] == [3, 3]  # the last step is partial
    assert (run[-1][1]["epoch"], run[-1][1]["position"]) == (1, 0)
    batches = list(sequential_batches(data, "heldout", 2))
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]


def test_errors(data) -> None:
    with pytest.raises(ValueError, match=r"global_batch: a global batch of 10 sequences does not split into "
                                         r"3 micro-batches per rank on 2 ranks \(need a positive multiple of 6\)"):
        _loader(data, global_batch=10, micro_batches=3, world_size=2)
    with pytest.raises(ValueError, match="owner_of_subtree"):
        _loader(data, world_size=2, owner_of_subtree=[0, 1])
    with pytest.raises(ValueError, match="owner_of_subtree"):
        _loader(data, world_size=2, owner_of_subtree=[0, 1, 2])
    with pytest.raises(ValueError, match="subtrees"):
        _loader(data, subtrees=[0, 0])
    with pytest.raises(ValueError, match="subtrees"):
        _loader(data, subtrees=[3])
    with pytest.raises(ValueError, match="rank"):
        _loader(data, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no split 'valid'"):
        StepLoader(data, "valid", global_batch=1, micro_batches=1, seed=0)

    _, state = next(iter(_loader(data)))
    with pytest.raises(ValueError, match="seed was 3, this loader has 4"):
        _loader(data, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        _loader(data, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="shard list fingerprint"):
        _loader(data).load_state_dict({**state, "fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="out of range"):
        _loader(data).load_state_dict({**state, "position": TOTAL})
    with pytest.raises(ValueError, match="lacks"):
        _loader(data).load_state_dict({"epoch": 0, "shard_cursor": 1, "sample_cursor": 2})  # an old state


def test_empty_heldout_split_is_refused(tmp_path: Path) -> None:
    data = make_prepared(tmp_path, {(0, 0): 2}, branching=[2, 2])
    with pytest.raises(ValueError, match="no held-out sequences"):
        list(sequential_batches(data, "heldout", 4))


def test_owner_groups_route_each_sequence_to_the_rank_storing_its_rows(data) -> None:
    """4 ranks, 2 groups of 2 on the [3, 2] tree: group 0 owns level-1 nodes 0 and 2, whose level-2 nodes
    0, 1 | 4, 5 its ranks 0 | 1 store (`by_subtree`'s cut); group 1's nodes 2 | 3 are on ranks 2 | 3. With
    home_of_node every rank runs as many sequences as the even cut gives it, the union is still every
    sequence once, and a sequence runs on the rank storing its level-2 row whenever that rank has room."""
    from hmtrain.memory.layout import home_of_node
    from tests.unit.test_route import check_routing

    owner, world, size = [0, 1, 0], 4, 2
    home = home_of_node(BRANCHING, 1, np.asarray(owner), world, size)
    assert home.tolist() == [0, 0, 2, 3, 1, 1]
    kw = dict(global_batch=8, micro_batches=1, world_size=world, owner_of_subtree=owner, group_size=size)
    even = [_take(_loader(data, rank=r, **kw), 8) for r in range(world)]
    routed = [_take(_loader(data, rank=r, home_of_node=home, home_level=1, **kw), 8) for r in range(world)]
    paths = data.sequences("train").paths
    away = {"even": 0, "routed": 0}  # sequences run on a rank not storing their level-2 row
    for step in range(8):
        for g in range(world // size):
            ranks = range(g * size, (g + 1) * size)
            before = [[i for i in _step_ids(even[r][step][0]) if i >= 0] for r in ranks]
            after = [[i for i in _step_ids(routed[r][step][0]) if i >= 0] for r in ranks]
            stream = sum(before, [])  # the group's sequences in stream order (the even cut keeps it)
            assert [len(a) for a in after] == [len(b) for b in before]  # the even cut's counts, so its shapes
            assert [len(routed[r][step][0]) for r in ranks] == [len(even[r][step][0]) for r in ranks]
            assert all(a == sorted(a, key=stream.index) for a in after)  # stream order on each rank
            assert sorted(sum(after, [])) == sorted(stream)  # the group's sequences, each once
            ids = np.asarray(stream, dtype=np.int64)
            where = {name: np.array([next(r for r, run in enumerate(runs) if i in run) for i in stream])
                     for name, runs in (("even", before), ("routed", after))}
            stores = home[paths(ids)[:, 1]] - g * size
            check_routing(stores, where["routed"], size)
            for name in away:
                away[name] += int((where[name] != stores).sum())
        assert routed[0][step][1] == even[0][step][1]  # the loader's state is the step's position alone
    assert away["routed"] < away["even"], away


def test_home_of_node_is_checked_where_it_enters(data) -> None:
    kw = dict(global_batch=8, world_size=4, owner_of_subtree=[0, 1, 0], group_size=2)
    with pytest.raises(ValueError, match="needs owner_of_subtree"):
        _loader(data, global_batch=8, world_size=4, home_of_node=[0] * 6, home_level=1)
    with pytest.raises(ValueError, match="a multiple of 3 nodes"):
        _loader(data, **kw, home_of_node=[0, 0, 2, 3], home_level=1)
    with pytest.raises(ValueError, match=r"home_of_node\[2\] = 0 is not a rank of the group owning"):
        _loader(data, **kw, home_of_node=[0, 0, 0, 3, 1, 1], home_level=1)
    with pytest.raises(ValueError, match="a sequence is on node"):
        _loader(data, **kw, home_of_node=[0, 2, 0], home_level=1)
