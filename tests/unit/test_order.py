"""The loader's order: a keyed permutation of any size with random access, and the stream over epochs."""

from __future__ import annotations

import numpy as np
import pytest

from hmtrain.data.loading.order import Permutation, StreamOrder


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_permutation_is_a_bijection_of_range_n(n: int) -> None:
    perm = Permutation(n, seed=0, epoch=0)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 5:
        assert perm.tolist() != list(range(n))


def test_permutation_depends_on_seed_and_epoch_only() -> None:
    def perm(seed, epoch):
        return Permutation(100, seed=seed, epoch=epoch)(np.arange(100)).tolist()

    assert perm(0, 0) == perm(0, 0)
    assert len({tuple(perm(s, e)) for s in range(3) for e in range(3)}) == 9
    # Random access: any slice of positions agrees with the full permutation.
    full = Permutation(1000, seed=7, epoch=2)(np.arange(1000))
    assert np.array_equal(Permutation(1000, seed=7, epoch=2)(np.array([999, 0, 500])), full[[999, 0, 500]])


def test_permutation_looks_uniform() -> None:
    # Where position 0 lands over 4000 keys, in 10 bins of a 50-element domain: Pearson's statistic
    # ~ chi-square(9), whose 99.9% quantile is 27.9 (scipy.stats.chi2.ppf(0.999, 9)).
    landing = np.array([Permutation(50, seed=s, epoch=0)(np.array([0]))[0] for s in range(4000)])
    counts = np.bincount(landing // 5, minlength=10)
    assert float(((counts - 400) ** 2 / 400).sum()) < 27.9
    # Neighbouring positions are not sent to neighbouring values.
    perm = Permutation(10_000, seed=1, epoch=0)(np.arange(10_000))
    assert abs(np.corrcoef(perm[:-1], perm[1:])[0, 1]) < 0.05


def test_huge_domain_needs_no_memory() -> None:
    n = 10**12
    out = Permutation(n, seed=3, epoch=9)(np.array([0, 1, n - 1]))
    assert ((out >= 0) & (out < n)).all() and len(set(out.tolist())) == 3
    with pytest.raises(ValueError, match="positions"):
        Permutation(n, seed=3, epoch=9)(np.array([n]))


def test_stream_crosses_epochs_over_id_ranges() -> None:
    order = StreamOrder([(10, 14), (0, 3)], seed=5)
    assert order.size == 7
    ids = order.ids(0, 21)
    wanted = [0, 1, 2, 10, 11, 12, 13]
    assert all(sorted(ids[e * 7:(e + 1) * 7].tolist()) == wanted for e in range(3))
    assert np.array_equal(order.ids(5, 12), ids[5:12])  # any window, directly
    assert StreamOrder([(10, 14), (0, 3)], seed=5, shuffle=False).ids(0, 9).tolist() == [10, 11, 12, 13, 0, 1, 2,
                                                                                         10, 11]
    assert order.ids(4, 4).tolist() == []
    with pytest.raises(ValueError, match="empty"):
        StreamOrder([(3, 3)], seed=0)
