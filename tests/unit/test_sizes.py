"""Memory sizes: the paper's bank / fetched numbers and input validation."""

import pytest

from hmtrain.memory.sizes import LevelSize, memory_sizes

PAPER_TREE = (16, 16, 16, 16)


@pytest.mark.parametrize(
    "n_layers, d_model, units, bank, fetched",
    [
        (35, 512, (256, 64, 16, 0), 4_624_220_160, 18_063_360),  # 160M anchor
        (24, 1024, (512, 128, 32, 0), 12_683_575_296, 49_545_216),  # 410M anchor
        (24, 2048, (768, 256, 16, 0), 21_139_292_160, 153_354_240),  # 1.4B anchor
    ],
)
def test_paper_sizes(n_layers, d_model, units, bank, fetched):
    sizes = memory_sizes(n_layers=n_layers, params_per_unit=3 * d_model, branching=PAPER_TREE, units=units)
    assert sum(s.bank_params for s in sizes) == bank
    assert sum(s.fetched_params for s in sizes) == fetched


def test_per_level_entries():
    sizes = memory_sizes(n_layers=35, params_per_unit=3 * 512, branching=PAPER_TREE, units=(256, 64, 16, 0))
    assert [s.nodes for s in sizes] == [16, 256, 4096, 65536]
    assert [s.level for s in sizes] == [0, 1, 2, 3]
    assert sizes[0] == LevelSize(level=0, nodes=16, units=256, bank_params=35 * 3 * 512 * 16 * 256,
                                 fetched_params=35 * 3 * 512 * 256)
    assert sizes[3].bank_params == 0 and sizes[3].fetched_params == 0


def test_params_per_unit():
    three = memory_sizes(n_layers=2, params_per_unit=3 * 8, branching=(2, 3), units=(4, 1))
    two = memory_sizes(n_layers=2, params_per_unit=2 * 8, branching=(2, 3), units=(4, 1))
    assert [s.bank_params for s in three] == [2 * 3 * 8 * 2 * 4, 2 * 3 * 8 * 6 * 1]
    assert [3 * s.bank_params for s in two] == [2 * s.bank_params for s in three]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(branching=(16, 16), units=(1,)), "one entry per level"),
        (dict(branching=(16, 0), units=(1, 1)), r"branching\[1\] must be >= 2, got 0"),
        (dict(branching=(16, 1), units=(1, 1)), r"branching\[1\] must be >= 2, got 1"),
        (dict(branching=(16, 16), units=(1, -2)), r"units\[1\] must be >= 0, got -2"),
        (dict(branching=(), units=()), "at least one level"),
        (dict(branching=(4.0,), units=(1,)), r"branching\[0\] must be an int"),
        (dict(branching=(4,), units=(1,), n_layers=0), "n_layers must be >= 1"),
        (dict(branching=(4,), units=(1,), params_per_unit=-1), "params_per_unit must be >= 1"),
    ],
)
def test_validation(kwargs, match):
    args = dict(n_layers=2, params_per_unit=24) | kwargs
    with pytest.raises(ValueError, match=match):
        memory_sizes(**args)
