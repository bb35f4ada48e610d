"""The routing tree: numbering, greedy descent, fitting, and its file."""
import math

import pytest
import torch
import torch.nn.functional as F

from hmtrain.config import check_branching
from hmtrain.data.routing.tree import Tree, fit_tree


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hierarchical_data(branching=(3, 3, 2), per_leaf=15, d=8, seed=0):
    """Points around leaf centres built top-down with offsets shrinking 10x per level,
    so the generating tree is the obvious clustering. Returns (x, generating leaf label)."""
    g = gen(seed)
    centres = torch.zeros(1, d)
    for k, scale in zip(branching, (100.0, 10.0, 1.0, 0.1)):
        centres = centres.repeat_interleave(k, 0) + scale * torch.randn(centres.shape[0] * k, d, generator=g)
    x = centres.repeat_interleave(per_leaf, 0) + 0.01 * torch.randn(centres.shape[0] * per_leaf, d, generator=g)
    labels = torch.arange(centres.shape[0]).repeat_interleave(per_leaf)
    return x, labels


def ancestors(tree: Tree, leaf: int) -> list[int]:
    path = [leaf]
    for level in range(tree.num_levels() - 1, 0, -1):
        path.insert(0, tree.parent(level, path[0]))
    return path


def assert_consistent(tree: Tree, paths: torch.Tensor) -> None:
    assert paths.dtype == torch.int64 and paths.shape[1] == tree.num_levels()
    for level in range(tree.num_levels()):
        assert ((paths[:, level] >= 0) & (paths[:, level] < tree.num_nodes(level))).all()
        if level:
            assert torch.equal(paths[:, level] // tree.branching[level], paths[:, level - 1])


@pytest.fixture(scope="module")
def fitted():
    x, labels = hierarchical_data()
    return x, labels, fit_tree(x, (3, 3, 2), progress=False)


def test_check_branching():
    assert check_branching([16, 16, 4]) == (16, 16, 4)
    with pytest.raises(ValueError, match="empty"):
        check_branching([])
    with pytest.raises(ValueError, match=r"branching\[1\] must be >= 2, got 0"):
        check_branching([4, 0])
    with pytest.raises(ValueError, match=r"branching\[1\] must be >= 2, got 1"):  # the one rule, as the config's
        fit_tree(torch.randn(10, 2), (2, 1), progress=False)
    with pytest.raises(ValueError, match=r"branching\[1\] must be an int, got 2.0"):
        check_branching([4, 2.0])
    with pytest.raises(ValueError, match="'4'"):
        check_branching(["4"])
    with pytest.raises(ValueError, match="True"):
        check_branching([True, 2])


def test_numbering():
    tree = Tree(branching=(4, 3), centroids=[torch.zeros(4, 2), torch.zeros(12, 2)])
    assert tree.num_levels() == 2
    assert [tree.num_nodes(0), tree.num_nodes(1)] == [4, 12]
    assert tree.parent(1, 7) == 2
    assert torch.equal(tree.parent(1, torch.arange(12)), torch.arange(4).repeat_interleave(3))
    with pytest.raises(ValueError, match="level index"):
        tree.parent(0, 1)
    with pytest.raises(ValueError, match="out of range"):
        tree.parent(1, 12)
    with pytest.raises(ValueError, match=r"centroids\[1\] has 11 rows"):
        Tree(branching=(4, 3), centroids=[torch.zeros(4, 2), torch.zeros(11, 2)])
    with pytest.raises(ValueError, match="one tensor per level"):
        Tree(branching=(4, 3), centroids=[torch.zeros(4, 2)])


def test_fit_recovers_the_generating_tree(fitted):
    x, labels, tree = fitted
    paths = tree.route(x)
    assert_consistent(tree, paths)
    tree.check_paths(paths)
    leaf_of = {}
    for label in labels.unique().tolist():
        leaves = paths[labels == label, -1].unique()
        assert leaves.numel() == 1, f"generating leaf {label} is spread over fitted leaves {leaves.tolist()}"
        leaf_of[label] = int(leaves)
    assert len(set(leaf_of.values())) == len(leaf_of)  # distinct generating leaves stay apart


def test_leaf_centroid_routes_to_its_own_path(fitted):
    _, _, tree = fitted
    leaves = tree.centroids[-1]
    paths = tree.route(leaves)
    for j in range(leaves.shape[0]):
        assert paths[j].tolist() == ancestors(tree, j)


def test_route_is_greedy_not_nearest_leaf():
    # 1-D: the point 4 is nearer level-1 node 0 (at 0) than node 1 (at 10), so greedy descent
    # stays under node 0 although the globally nearest leaf (5) is a child of node 1.
    tree = Tree(
        branching=(2, 2),
        centroids=[torch.tensor([[0.0], [10.0]]), torch.tensor([[-3.0], [-1.0], [5.0], [15.0]])],
    )
    assert tree.route(torch.tensor([[4.0], [9.0], [-2.5]])).tolist() == [[0, 1], [1, 2], [0, 0]]


def test_route_batches_agree_and_handle_empty_input(fitted):
    x, _, tree = fitted
    assert torch.equal(tree.route(x, batch_size=7), tree.route(x))
    assert tree.route(x[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        tree.route(torch.randn(4, 5))


def test_check_paths_names_the_first_bad_row_and_level(fitted):
    x, _, tree = fitted
    paths = tree.route(x[:10])
    tree.check_paths(paths)

    wrong_parent = paths.clone()
    wrong_parent[5, 2] = (wrong_parent[5, 1] * 2 + 2) % tree.num_nodes(2)  # a leaf of another parent
    wrong_parent[2, 1] = (wrong_parent[2, 0] * 3 + 3) % tree.num_nodes(1)
    with pytest.raises(ValueError, match=r"row 2, level 1: .* has parent"):
        tree.check_paths(wrong_parent)

    out_of_range = paths.clone()
    out_of_range[4, 0] = 3
    with pytest.raises(ValueError, match=r"row 4, level 0: node 3 is out of range \[0, 3\)"):
        tree.check_paths(out_of_range)
    out_of_range[4, 0] = -1
    with pytest.raises(ValueError, match=r"row 4, level 0: node -1"):
        tree.check_paths(out_of_range)

    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        tree.check_paths(paths[:, :2])
    with pytest.raises(ValueError, match="integer"):
        tree.check_paths(paths.float())


def test_save_load_round_trip(fitted, tmp_path):
    x, _, tree = fitted
    target = tmp_path / "prepared" / "tree.pt"
    tree.save(target)
    assert [p.name for p in target.parent.iterdir()] == ["tree.pt"]  # no temp file left behind
    loaded = Tree.load(target)
    assert loaded.branching == tree.branching
    for a, b in zip(loaded.centroids, tree.centroids):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    probe = torch.cat([x, 30.0 * torch.randn(50, 8, generator=gen(1))])
    assert torch.equal(loaded.route(probe), tree.route(probe))


def test_load_errors_are_clear(fitted, tmp_path):
    _, _, tree = fitted
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        Tree.load(tmp_path / "missing.pt")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="garbage.pt is corrupt"):
        Tree.load(garbage)

    good = tmp_path / "good.pt"
    tree.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        Tree.load(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not an hmtrain tree"):
        Tree.load(foreign)

    mismatch = tmp_path / "mismatch.pt"
    torch.save({"format": "hmtrain.tree", "version": 1, "branching": [2, 2],
                "centroids": [torch.zeros(2, 3), torch.zeros(3, 3)]}, mismatch)
    with pytest.raises(ValueError, match=r"inconsistent: centroids\[1\] has 3 rows"):
        Tree.load(mismatch)


def test_fit_is_deterministic_and_balanced():
    x = F.normalize(torch.randn(2000, 32, generator=gen(2)), dim=1)
    kwargs = dict(steps=10, subsample=800, progress=False)
    a = fit_tree(x, (8, 8, 4), seed=3, **kwargs)
    b = fit_tree(x, (8, 8, 4), seed=3, **kwargs)
    c = fit_tree(x, (8, 8, 4), seed=4, **kwargs)
    assert all(torch.equal(p, q) for p, q in zip(a.centroids, b.centroids))
    assert not torch.equal(a.centroids[0], c.centroids[0])
    assert [t.shape for t in a.centroids] == [(8, 32), (64, 32), (256, 32)]
    paths = a.route(x)
    assert_consistent(a, paths)
    # the balance rule at level 1, measured on all points (it is enforced on subsamples)
    assert torch.bincount(paths[:, 0], minlength=8).max().item() <= (1.5 / 8 + 0.03) * x.shape[0]


def test_fit_on_fewer_points_than_nodes():
    x = torch.randn(5, 6, generator=gen(3))
    tree = fit_tree(x, (4, 4, 2), progress=True)
    assert [t.shape for t in tree.centroids] == [(4, 6), (16, 6), (32, 6)]
    assert all(torch.isfinite(t).all() for t in tree.centroids)
    # empty nodes still get children, all distinct, so every path exists
    assert torch.unique(tree.centroids[-1], dim=0).shape[0] == 32
    paths = tree.route(x)
    assert_consistent(tree, paths)
    # once a node holds <= k points its children are those points, so each point ends on itself
    torch.testing.assert_close(tree.centroids[-1][paths[:, -1]], x)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fit_tree(torch.randn(10), (2,), progress=False)
    with pytest.raises(ValueError, match="finite"):
        fit_tree(torch.tensor([[0.0, math.nan], [1.0, 2.0]]), (2,), progress=False)
    with pytest.raises(ValueError, match="branching"):
        fit_tree(torch.randn(10, 2), (2, -1), progress=False)
    with pytest.raises(ValueError, match="balance"):
        fit_tree(torch.randn(10, 2), (2,), balance=0.9, progress=False)
