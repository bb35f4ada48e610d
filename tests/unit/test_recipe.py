"""The two-phase recipe: learning rates on both sides of the phase switch, batch sizes, generic draws."""
import numpy as np
import pytest

from hmtrain.config import load_config
from hmtrain.train.recipe import DENSE, MEMORY, PRETRAIN, Recipe, uniform_hash


def recipe(*overrides, has_memory=True):
    base = ["train.pretrain_steps=100", "train.memory_steps=50", "train.anchor=cotrain",
            "train.anchor_optim.lr=5e-3", "train.anchor_optim.min_lr=5e-5", "train.anchor_optim.warmup_steps=10",
            "train.anchor_optim.schedule=cosine", "train.memory_optim.lr=1e-4", "train.memory_optim.min_lr=1e-5",
            "train.memory_optim.warmup_steps=0", "train.memory_optim.weight_decay=1e-3",
            "train.global_batch_size=32", "train.micro_batch_size=8"]
    return Recipe(load_config("tiny", [*base, *overrides]), has_memory=has_memory)


def test_anchor_pretraining_anneals_by_the_switch_and_the_memory_phase_starts_its_own_schedule():
    r = recipe()
    assert r.at(0).anchor_lr == pytest.approx(5e-3 / 10)  # warmup
    assert r.at(9).anchor_lr == pytest.approx(5e-3)
    last = r.at(99)
    assert last.phase == PRETRAIN and last.memory_lr == 0.0
    assert last.anchor_lr == pytest.approx(5e-5, rel=0.05)  # annealed to the floor by the last step
    first = r.at(100)
    assert first.phase == MEMORY
    # the co-trained anchor follows the memory phase's schedule, from its peak, like the bank
    assert first.anchor_lr == pytest.approx(1e-4) and first.memory_lr == pytest.approx(1e-4)
    assert r.at(149).anchor_lr == pytest.approx(1e-5, rel=0.05)
    assert r.anchor_optim(MEMORY).weight_decay == pytest.approx(1e-3)
    assert r.anchor_optim(PRETRAIN).weight_decay == pytest.approx(0.1)


def test_cotrain_optim_overrides_the_anchor_in_the_memory_phase_and_frozen_does_not_step():
    r = recipe("train.cotrain_optim={lr: 3e-4, min_lr: 3e-5, warmup_steps: 0}")
    assert r.at(100).anchor_lr == pytest.approx(3e-4) and r.at(100).memory_lr == pytest.approx(1e-4)
    frozen = recipe("train.anchor=frozen").at(120)
    assert not frozen.anchor_trains and frozen.anchor_lr == 0.0 and frozen.memory_lr > 0


def test_pretraining_batch_and_dense_schedule():
    r = recipe("train.pretrain_global_batch_size=16")
    assert r.at(99).global_batch == 16 and r.at(100).global_batch == 32
    dense = recipe("train.mode=dense")
    assert {dense.at(s).phase for s in (0, 120)} == {DENSE}
    assert dense.at(149).anchor_lr == pytest.approx(5e-5, rel=0.05)  # one schedule over both phases' steps
    assert dense.at(100).anchor_lr > 10 * 5e-5
    alone = recipe(has_memory=False)  # no memory: the anchor schedule spans every step
    assert alone.at(120).phase == PRETRAIN and alone.at(99).anchor_lr > 10 * 5e-5


def test_generic_memory_rate_and_independence_from_the_rank_split():
    r = recipe()  # tiny: k_1 = 8 -> 1/9
    assert r.generic_prob == pytest.approx(1 / 9)
    ids = np.arange(200_000)
    rate = r.generic_mask(7, ids).mean()
    assert abs(rate - 1 / 9) < 4 * np.sqrt((1 / 9) * (8 / 9) / len(ids))
    whole = r.generic_mask(7, ids[:1000])
    assert np.array_equal(np.concatenate([r.generic_mask(7, ids[:300]), r.generic_mask(7, ids[300:1000])]), whole)
    assert not np.array_equal(r.generic_mask(8, ids[:1000]), whole)  # a new draw every step
    assert recipe("memory.generic=false").generic_mask(7, ids[:100]).sum() == 0


def test_uniform_hash_is_uniform_and_a_pure_function():
    u = uniform_hash(3, 11, np.arange(100_000))
    assert 0.0 <= u.min() and u.max() < 1.0
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.abs(counts - 10_000).max() < 500
    assert np.array_equal(uniform_hash(3, 11, np.arange(5)), u[:5])
