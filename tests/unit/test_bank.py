"""MemoryBank: fetch, gradients to fetched rows only, accumulation, checkpoints."""

import pytest
import torch
import torch.nn.functional as F

import hmtrain.memory.bank as bank_mod
from hmtrain.memory.bank import MemoryBank
from hmtrain.memory.sizes import memory_sizes

# tiny tree: level 0 has 2 nodes, level 1 has 6 (parent = node // 3), level 2 has 12 (no units)
CFG = dict(n_layers=2, d_model=4, branching=(2, 3, 2), units=(3, 2, 0))
M = 5
HP = dict(lr=1e-2, weight_decay=0.1)


def make_bank(**kw) -> MemoryBank:
    return MemoryBank(**(CFG | HP | kw))


def path(leaf: int) -> list[int]:
    # leaf id at level 2 -> full path (level-2 branching 2, level-1 branching 3)
    return [leaf // 6, leaf // 2, leaf]


def paths(*leaves: int) -> torch.Tensor:
    return torch.tensor([path(x) for x in leaves], dtype=torch.int64)


def toy_loss(fetched, seed: int = 0) -> torch.Tensor:
    """A SwiGLU memory FFN on random inputs, summed over sequences (so micro-batches add up)."""
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for i in range(CFG["n_layers"]):
        gate, up, down = fetched.layer(i)
        x = torch.randn(fetched.batch_size, 3, CFG["d_model"], generator=gen)
        h = F.silu(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))  # [B, T, M]
        y = h @ down.transpose(1, 2)  # [B, T, d]
        # the extra gate term gives gate rows a gradient although down starts at zero
        loss = loss + (y * x).sum() + 0.1 * (gate * up).sum()
    return loss


def train_step(bank, fetched, seed=0):
    toy_loss(fetched, seed).backward()
    bank.accumulate_grads(fetched)


def clone_state(bank):
    return {k: v.clone() for k, v in bank.state_dict().items()}


def test_shapes_init_and_sizes():
    bank = make_bank()
    w = bank.tables
    assert set(w) == {"level0", "level1", "generic"}  # level 2 has no units: no table
    assert w["level0"].shape == (2, 2, 3, 3, 4)
    assert w["level1"].shape == (6, 2, 3, 2, 4)
    assert w["generic"].shape == (1, 2, 3, M, 4)
    for t in w.values():
        assert torch.count_nonzero(t[:, :, 2]) == 0  # down rows zero: fresh memory is a no-op
        assert torch.count_nonzero(t[:, :, 0:2]) == t[:, :, 0:2].numel()
    big = MemoryBank(n_layers=4, d_model=64, branching=(64,), units=(32,), init_std=0.02, generic=False)
    assert big.tables["level0"][:, :, 0:2].std().item() == pytest.approx(0.02, rel=0.05)
    assert bank.units_total == M and bank.num_levels == 3
    sizes = memory_sizes(**CFG)
    assert bank.num_parameters(include_generic=False) == sum(s.bank_params for s in sizes)
    assert bank.num_parameters() == sum(s.bank_params for s in sizes) + 2 * 3 * M * 4
    assert bank.fetched_parameters() == sum(s.fetched_params for s in sizes)


def test_init_is_deterministic_and_chunked(monkeypatch):
    a, b, c = make_bank(seed=3), make_bank(seed=3), make_bank(seed=4)
    for name in a.tables:
        assert torch.equal(a.tables[name], b.tables[name])
        assert not torch.equal(a.tables[name], c.tables[name])
    monkeypatch.setattr(bank_mod, "_INIT_CHUNK_ELEMENTS", 1)  # one row per chunk
    d = make_bank(seed=3)
    t = d.tables["level1"]
    assert torch.count_nonzero(t[:, :, 2]) == 0 and torch.count_nonzero(t[:, :, 0:2]) == t[:, :, 0:2].numel()
    assert not torch.equal(t[0], t[1])


def test_fetch_matches_manual_indexing():
    bank = make_bank()
    w = bank.tables
    p = paths(11, 0, 7, 11)
    fetched = bank.fetch(p)
    assert fetched.batch_size == 4 and fetched.units == M
    assert fetched.touched["level0"].tolist() == [0, 1]
    assert fetched.touched["level1"].tolist() == [0, 3, 5]
    assert "level2" not in fetched.touched and "generic" not in fetched.touched
    for i in range(CFG["n_layers"]):
        gate, up, down = fetched.layer(i)
        assert gate.shape == (4, M, 4) and up.shape == (4, M, 4) and down.shape == (4, 4, M)
        for b in range(4):
            n0, n1 = p[b, 0], p[b, 1]
            for slot, got in ((0, gate[b]), (1, up[b]), (2, down[b].T)):
                # level order: level-0 units first, then level-1 units
                want = torch.cat([w["level0"][n0, i, slot], w["level1"][n1, i, slot]], dim=0)
                assert torch.equal(got, want)


def test_generic_substitution():
    bank = make_bank()
    g = bank.tables["generic"][0]
    p = paths(0, 5, 9)
    fetched = bank.fetch(p, use_generic=torch.tensor([False, True, False]))
    assert fetched.touched["generic"].tolist() == [0]
    assert fetched.touched["level0"].tolist() == [0, 1]
    assert fetched.touched["level1"].tolist() == [0, 4]  # the generic sequence's path is not fetched
    gate, up, down = fetched.layer(1)
    assert torch.equal(gate[1], g[1, 0]) and torch.equal(up[1], g[1, 1]) and torch.equal(down[1], g[1, 2].T)
    want0 = torch.cat([bank.tables["level0"][0, 1, 0], bank.tables["level1"][0, 1, 0]])
    assert torch.equal(gate[0], want0)
    # all sequences generic: no level rows at all
    allgen = bank.fetch(p, use_generic=torch.ones(3, dtype=torch.bool))
    assert set(allgen.touched) == {"generic"}
    assert torch.equal(allgen.layer(0)[0], g[0, 0].expand(3, M, 4))
    with pytest.raises(ValueError, match="generic=False"):
        make_bank(generic=False).fetch(p, use_generic=torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match=r"use_generic must be a bool tensor of shape \[3\]"):
        bank.fetch(p, use_generic=torch.tensor([1, 0, 0]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([[0, 0]]), r"shape \[B >= 1, 3\].*\(1, 2\)"),
        (torch.tensor([0, 0, 0]), r"shape \[B >= 1, 3\]"),
        (torch.tensor([[0, 0, 0]], dtype=torch.int32), "int64, got torch.int32"),
        (torch.tensor([[0, 0, 0], [1, 6, 12]]), r"paths\[1, 1\] = 6 is out of range for level 1 with 6 nodes"),
        (torch.tensor([[0, 0, 0], [-1, 0, 0]]), r"paths\[1, 0\] = -1 is out of range"),
        (torch.tensor([[0, 0, 0], [0, 4, 8]]), r"paths\[1\].*node 4 at level 1 has parent 1.*paths\[1, 0\] = 0"),
        (torch.tensor([[0, 1, 4]]), r"paths\[0\].*node 4 at level 2 has parent 2.*paths\[0, 1\] = 1"),
    ],
)
def test_fetch_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        make_bank().fetch(bad)


def test_layer_index_validation():
    fetched = make_bank().fetch(paths(0))
    with pytest.raises(ValueError, match=r"layer index must be an int in \[0, 2\), got 2"):
        fetched.layer(2)


def test_gradients_reach_only_fetched_rows():
    bank = make_bank()
    before = clone_state(bank)
    train_step(bank, bank.fetch(paths(0, 1, 8)))  # paths [0,0,0], [0,0,1], [1,4,8]
    updated = bank.step()
    assert updated == {"level0": 2, "level1": 2, "generic": 0}
    after = bank.state_dict()
    touched = {"level0": [0, 1], "level1": [0, 4]}
    for name, rows in touched.items():
        others = [r for r in range(after[f"{name}.weight"].shape[0]) if r not in rows]
        for kind in ("weight", "exp_avg", "exp_avg_sq", "step"):
            key = f"{name}.{kind}"
            assert torch.equal(after[key][others], before[key][others]), key
        for r in rows:
            assert not torch.equal(after[f"{name}.weight"][r, :, 0], before[f"{name}.weight"][r, :, 0])
            assert not torch.equal(after[f"{name}.weight"][r, :, 2], before[f"{name}.weight"][r, :, 2])
        assert after[f"{name}.step"][rows].tolist() == [1, 1]
    for kind in ("weight", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(after[f"generic.{kind}"], before[f"generic.{kind}"])
    # nothing pending after a step: a second step changes nothing
    snapshot = clone_state(bank)
    assert bank.step() == {"level0": 0, "level1": 0, "generic": 0}
    for k, v in bank.state_dict().items():
        assert torch.equal(v, snapshot[k])


def test_generic_row_trains_when_used():
    bank = make_bank()
    before = bank.tables["generic"].clone()
    train_step(bank, bank.fetch(paths(0, 5), use_generic=torch.tensor([False, True])))
    assert bank.step() == {"level0": 1, "level1": 1, "generic": 1}
    assert not torch.equal(bank.tables["generic"], before)


def test_two_micro_batches_equal_one_batch():
    leaves_a, leaves_b = (0, 3, 7), (3, 11)
    split, whole = make_bank(), make_bank()
    train_step(split, split.fetch(paths(*leaves_a)), seed=0)
    train_step(split, split.fetch(paths(*leaves_b)), seed=1)
    # same inputs as the two micro-batches, in one batch: the loss is a sum over sequences
    fetched = whole.fetch(paths(*leaves_a, *leaves_b))
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    loss = torch.zeros(())
    for i in range(CFG["n_layers"]):
        gate, up, down = fetched.layer(i)
        x = torch.cat([torch.randn(3, 3, 4, generator=gen_a), torch.randn(2, 3, 4, generator=gen_b)])
        h = F.silu(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))
        loss = loss + ((h @ down.transpose(1, 2)) * x).sum() + 0.1 * (gate * up).sum()
    loss.backward()
    whole.accumulate_grads(fetched)
    torch.testing.assert_close(split.pending_grad_norm(), whole.pending_grad_norm())
    assert split.step() == whole.step()
    for k, v in split.state_dict().items():
        torch.testing.assert_close(v, whole.state_dict()[k], rtol=1e-5, atol=1e-7)


def test_grad_norm_and_scaling():
    bank = make_bank()
    f1, f2 = bank.fetch(paths(0, 6)), bank.fetch(paths(1))
    toy_loss(f1, 0).backward()
    toy_loss(f2, 1).backward()
    # expected: norm of the per-row sum over both micro-batches (row 0 of each level is shared)
    g0 = f1._leaves["level0"].grad.clone()
    g0[0] += f2._leaves["level0"].grad[0]
    g1 = torch.zeros(6, 2, 3, 2, 4)
    g1[f1.touched["level1"]] += f1._leaves["level1"].grad
    g1[f2.touched["level1"]] += f2._leaves["level1"].grad
    want = torch.sqrt(g0.pow(2).sum() + g1.pow(2).sum())
    bank.accumulate_grads(f1)
    bank.accumulate_grads(f2)
    norm = bank.pending_grad_norm()
    assert norm.dtype == torch.float32 and norm.ndim == 0
    torch.testing.assert_close(norm, want)
    bank.scale_pending_grads(0.5)
    torch.testing.assert_close(bank.pending_grad_norm(), want * 0.5)
    with pytest.raises(ValueError, match="already accumulated"):
        bank.accumulate_grads(f1)
    bank.zero_pending()
    assert bank.pending_grad_norm().item() == 0.0
    assert bank.step() == {"level0": 0, "level1": 0, "generic": 0}


def test_rows_without_grad_are_skipped():
    bank = make_bank()
    before = clone_state(bank)
    fetched = bank.fetch(paths(0))
    bank.accumulate_grads(fetched)  # no backward ran: every leaf grad is None
    assert bank.step() == {"level0": 0, "level1": 0, "generic": 0}
    for k, v in bank.state_dict().items():
        assert torch.equal(v, before[k])


def test_eval_fetch_builds_no_graph():
    bank = make_bank()
    fetched = bank.fetch(paths(2, 9), requires_grad=False)
    gate, _, _ = fetched.layer(0)
    assert not gate.requires_grad
    with pytest.raises(ValueError, match="requires_grad=False"):
        bank.accumulate_grads(fetched)
    with torch.no_grad():
        gate, _, _ = bank.fetch(paths(2, 9)).layer(1)
    assert not gate.requires_grad
    with pytest.raises(ValueError, match="this bank's fetch"):
        make_bank().accumulate_grads(bank.fetch(paths(0)))


def test_state_dict_round_trip_and_strict_load(tmp_path):
    bank = make_bank(seed=1)
    train_step(bank, bank.fetch(paths(0, 4, 11)))
    bank.step()
    state = bank.state_dict()
    assert set(state) == {f"{t}.{k}" for t in ("level0", "level1", "generic")
                          for k in ("weight", "exp_avg", "exp_avg_sq", "step")}
    torch.save(state, tmp_path / "bank.pt")
    other = make_bank(seed=2)
    live = other.state_dict()
    other.load_state_dict(torch.load(tmp_path / "bank.pt"))
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k])
        assert v is live[k]  # loaded in place: torch.distributed.checkpoint relies on it
    # both continue identically
    for b in (bank, other):
        train_step(b, b.fetch(paths(5, 6)), seed=3)
        b.step()
    for k, v in other.state_dict().items():
        assert torch.equal(v, bank.state_dict()[k])

    bad = dict(state)
    bad["level1.exp_avg"] = torch.zeros(6, 2, 3, 3, 4)
    with pytest.raises(ValueError, match=r"level1\.exp_avg.*\(6, 2, 3, 3, 4\).*\(6, 2, 3, 2, 4\)"):
        other.load_state_dict(bad)
    missing = {k: v for k, v in state.items() if k != "generic.step"}
    with pytest.raises(ValueError, match=r"missing keys \['generic.step'\]"):
        other.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['level2.weight'\]"):
        other.load_state_dict(state | {"level2.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(units=(0, 0, 0)), "at least one level a positive"),
        (dict(units=(1, 2)), "one entry per level"),
        (dict(branching=(2, 0, 2)), r"branching\[1\]"),
        (dict(n_layers=0), "n_layers"),
        (dict(lr=-1.0), "lr"),
    ],
)
def test_constructor_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        make_bank(**kw)
