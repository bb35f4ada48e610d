"""k-means for the routing tree: exactness on small data, the balance rule, edge cases."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import hmtrain.data.routing.kmeans as kmeans_module
from hmtrain.data.routing.kmeans import assign, kmeans, kmeans_plus_plus


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sse(x: torch.Tensor, centroids: torch.Tensor) -> float:
    return assign(x, centroids)[1].sum().item()


def brute_force_sse(x: torch.Tensor, k: int) -> float:
    """Optimal k-means SSE by enumerating every assignment of the n points to k clusters."""
    n = x.shape[0]
    labels = torch.tensor(list(itertools.product(range(k), repeat=n)))  # [k^n, n]
    onehot = F.one_hot(labels, k).to(x.dtype)  # [A, n, k]
    counts = onehot.sum(1)  # [A, k]
    sums = torch.einsum("ank,nd->akd", onehot, x)
    # SSE = sum ||x||^2 - sum_c ||sum_c||^2 / n_c (empty clusters contribute nothing)
    between = (sums.pow(2).sum(2) / counts.clamp(min=1)).sum(1)
    return (x.pow(2).sum() - between).min().item()


def blobs(seed: int, d: int = 16) -> torch.Tensor:
    """One tight blob of 1800 unit vectors and three small far ones of 50 (1950 points)."""
    g = gen(seed)
    e = torch.eye(d)
    big = F.normalize(e[0] + 0.15 * torch.randn(1800, d, generator=g), dim=1)
    small = [F.normalize(e[j + 1] + 0.05 * torch.randn(50, d, generator=g), dim=1) for j in range(3)]
    return torch.cat([big, *small])


def largest_share(x: torch.Tensor, centroids: torch.Tensor) -> float:
    ids, _ = assign(x, centroids)
    return torch.bincount(ids, minlength=centroids.shape[0]).max().item() / x.shape[0]


@pytest.mark.parametrize("chunk", [65536, 7])
def test_assign_matches_brute_force(chunk):
    g = gen(0)
    x = torch.randn(100, 5, generator=g, dtype=torch.float64)
    c = torch.randn(9, 5, generator=g, dtype=torch.float64)
    ids, d2 = assign(x, c, chunk=chunk)
    full = torch.cdist(x, c).pow(2)
    assert ids.dtype == torch.int64 and ids.shape == (100,)
    assert torch.equal(ids, full.argmin(1))
    torch.testing.assert_close(d2, full.min(1).values)


def test_assign_float32_distances_are_nonnegative():
    x = F.normalize(torch.randn(300, 32, generator=gen(1)), dim=1)
    ids, d2 = assign(x, x[:10])
    assert (d2 >= 0).all()
    assert torch.equal(ids[:10], torch.arange(10))


@pytest.mark.parametrize("data_seed,k", [(0, 2), (1, 3), (2, 3), (3, 2)])
def test_kmeans_reaches_brute_force_optimum(data_seed, k):
    x = torch.randn(10, 2, generator=gen(data_seed), dtype=torch.float64)
    optimum = brute_force_sse(x, k)
    # balance disabled: the rule may legitimately forbid the unconstrained optimum
    # Lloyd has local optima, so a few seeds; each result must still be a valid SSE.
    found = [sse(x, kmeans(x, k, balance=math.inf, generator=gen(s))) for s in range(12)]
    assert min(found) == pytest.approx(optimum, rel=1e-9, abs=1e-12)
    assert all(f >= optimum - 1e-9 for f in found)


def test_kmeans_finds_separated_clusters_with_default_balance():
    # Three equal, well-separated groups: the balance rule must not stop the obvious answer.
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centers.repeat_interleave(3, 0) + 0.1 * torch.randn(9, 2, generator=gen(4))).double()
    c = kmeans(x, 3, generator=gen(0))
    assert sse(x, c) == pytest.approx(brute_force_sse(x, 3), rel=1e-9)


def test_kmeans_plus_plus_picks_distinct_rows():
    x = torch.randn(50, 4, generator=gen(5))
    c = kmeans_plus_plus(x, 6, gen(0))
    assert c.shape == (6, 4)
    rows = [int((x == row).all(1).nonzero()[0, 0]) for row in c]  # every centroid is a row of x
    assert len(set(rows)) == 6
    assert torch.equal(c, kmeans_plus_plus(x, 6, gen(0)))


def test_kmeans_plus_plus_avoids_zero_weight_points():
    # 20 copies of one point and one other point: the second draw must take the other point.
    x = torch.cat([torch.zeros(20, 3), torch.ones(1, 3)])
    for s in range(5):
        c = kmeans_plus_plus(x, 2, gen(s))
        assert {tuple(r.tolist()) for r in c} == {(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)}


@pytest.mark.parametrize("subsample", [6400, 300])
def test_kmeans_is_deterministic_for_a_seed(subsample):
    x = F.normalize(torch.randn(1000, 24, generator=gen(6)), dim=1)
    a = kmeans(x, 8, subsample=subsample, generator=gen(3))
    b = kmeans(x, 8, subsample=subsample, generator=gen(3))
    assert torch.equal(a, b)
    assert a.shape == (8, 24) and a.dtype == torch.float32


@pytest.mark.parametrize("subsample", [6400, 600])
def test_balance_rule_limits_the_largest_cluster(subsample):
    k, balance = 4, 1.5
    shares = [largest_share(x, kmeans(x, k, subsample=subsample, generator=gen(s)))
              for s, x in ((s, blobs(s)) for s in range(5))]
    assert max(shares) <= balance / k + 0.02, shares
    # Without the rule, centroids drawn to the far blobs leave the big one to one or two clusters.
    unbalanced = [largest_share(x, kmeans(x, k, subsample=subsample, balance=math.inf, generator=gen(s)))
                  for s, x in ((s, blobs(s)) for s in range(5))]
    assert max(unbalanced) > balance / k + 0.05, unbalanced


def test_fewer_points_than_clusters_gives_valid_centroids():
    x = torch.randn(3, 5, generator=gen(7))
    c = kmeans(x, 8, generator=gen(0))
    assert c.shape == (8, 5) and torch.isfinite(c).all()
    torch.testing.assert_close(c[:3], x)  # each point keeps a centroid of its own
    assert torch.unique(c, dim=0).shape[0] == 8  # copies are perturbed, not identical
    assert torch.equal(c, kmeans(x, 8, generator=gen(0)))


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(30, 4),  # every point identical: k-means++ weights all zero
        torch.cat([torch.zeros(25, 4), torch.ones(5, 4)]),  # two distinct points, k = 4: empty clusters
    ],
)
def test_degenerate_data_gives_finite_centroids(x):
    c = kmeans(x, 4, generator=gen(0))
    assert c.shape == (4, 4) and torch.isfinite(c).all()
    _, d2 = assign(x, c)
    assert d2.max().item() == pytest.approx(0.0, abs=1e-6)  # every point still has an exact centroid


def test_empty_cluster_is_reseeded_at_the_worst_served_point():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [9.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [5.0, 0.0], [100.0, 0.0]])  # the last one owns no point
    ids, d2 = assign(x, c)
    new = kmeans_module._update(x, c, ids, d2)
    assert torch.isfinite(new).all()
    torch.testing.assert_close(new[0], torch.tensor([0.05, 0.0]))
    torch.testing.assert_close(new[2], torch.tensor([9.0, 0.0]))  # the point farthest from its centroid


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be"),
        (dict(k=2, steps=-1), "steps"),
        (dict(k=2, subsample=0), "subsample"),
        (dict(k=2, balance=0.5), "balance"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match=match):
        kmeans(x, generator=gen(0), **kwargs)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(10), 2, generator=gen(0))
    with pytest.raises(ValueError, match="at least one row"):
        kmeans(torch.randn(0, 3), 2, generator=gen(0))
    with pytest.raises(ValueError, match="dim"):
        assign(torch.randn(4, 3), torch.randn(2, 5))
