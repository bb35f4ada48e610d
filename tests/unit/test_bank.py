"""MemoryBank on one process: fetch and gradients against a dense reference, for every transport."""

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from hmtrain.memory.bank import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.memory.sparse_adamw import SparseAdamW

# tiny tree: level 1 has 2 nodes, level 2 has 6 (parent = node // 3), level 3 has 12 (no units)
D = 4  # d_model
CFG = dict(n_layers=2, kind=SwiGLUUnits(d_model=D), branching=(2, 3, 2), units=(3, 2, 0))
UNITS = {"level1": (0, 3), "level2": (3, 2)}  # table -> (offset, units) in the concatenated memory
M = 5
# the three ways a table can live on a rank; on one process all of them hold every row
TRANSPORTS = {"remote": dict(placement="gather"), "local": dict(placement="owner"),
              "replicated": dict(placement="gather", replicate_levels=3)}


def make_bank(transport="remote", **kw) -> MemoryBank:
    return MemoryBank(**(CFG | TRANSPORTS[transport] | {"optimizer": SparseAdamW(lr=1e-2, weight_decay=0.1)} | kw))


def paths(*leaves: int) -> np.ndarray:
    return np.array([[leaf // 6, leaf // 2, leaf] for leaf in leaves], dtype=np.int64)


def toy_loss(layers, batch: int, seed: int) -> torch.Tensor:
    """A SwiGLU memory FFN on random inputs, summed over sequences (so micro-batches add up)."""
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for gate, up, down in layers:
        x = torch.randn(batch, 3, D, generator=gen)
        y = (F.silu(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))) @ down.transpose(1, 2)
        # the extra gate term gives gate rows a gradient although down starts at zero
        loss = loss + (y * x).sum() + 0.1 * (gate * up).sum()
    return loss


def dense_blocks(tables: dict[str, torch.Tensor], p: np.ndarray, use_generic: np.ndarray, layer: int):
    """The reference: each sequence's blocks by direct indexing of the full tables."""
    per_seq = []
    for b in range(len(p)):
        if use_generic[b]:
            per_seq.append(tables["generic"][0, layer])
        else:
            per_seq.append(torch.cat([tables[f"level{lvl + 1}"][p[b, lvl], layer] for lvl in (0, 1)], dim=1))
    mem = torch.stack(per_seq)  # [B, 3, M, d]
    return mem[:, 0], mem[:, 1], mem[:, 2].transpose(1, 2)


def randomize(bank: MemoryBank, seed: int = 1) -> None:
    """Non-zero down rows, so every slot gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    for table in bank.tables.values():
        table.copy_(torch.randn(table.shape, generator=gen))


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_fetch_and_gradients_match_dense_reference(transport):
    bank = make_bank(transport)
    randomize(bank)
    reference = {name: t.clone().requires_grad_() for name, t in bank.tables.items()}
    batches = [(paths(0, 7, 7, 11, 3), np.array([False, False, True, False, False])),
               (paths(7, 1), np.array([False, False]))]
    plan = bank.plan_step(batches)
    for k, (p, generic) in enumerate(batches):
        fetched = bank.fetch(plan, k)
        layers = [fetched.layer(i) for i in range(CFG["n_layers"])]
        expected = [dense_blocks(reference, p, generic, i) for i in range(CFG["n_layers"])]
        for got, want in zip(layers, expected):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
        toy_loss(layers, len(p), seed=k).backward()
        toy_loss(expected, len(p), seed=k).backward()
        bank.return_grads(fetched)
    sq_norm = bank.finish_grads()
    dense_sq = sum(float(t.grad.pow(2).sum()) for t in reference.values())
    assert float(sq_norm) == pytest.approx(dense_sq, rel=1e-5)
    for name, rows in plan.step_rows.items():
        torch.testing.assert_close(bank._grads[name], reference[name].grad[rows], rtol=1e-5, atol=1e-6)
        untouched = np.setdiff1d(np.arange(len(reference[name])), rows)
        assert torch.count_nonzero(reference[name].grad[untouched]) == 0


def test_step_updates_touched_rows_only_and_matches_sparse_adamw():
    bank = make_bank()
    randomize(bank)
    before = {name: {f: t.clone() for f, t in state.items()} for name, state in bank._state.items()}
    plan = bank.plan_step([(paths(0, 7), None)])
    fetched = bank.fetch(plan, 0)
    toy_loss([fetched.layer(i) for i in range(CFG["n_layers"])], 2, seed=0).backward()
    bank.return_grads(fetched)
    bank.finish_grads()
    grads = {name: g.clone() for name, g in bank._grads.items()}
    updated = bank.step(lr=1e-2, grad_scale=0.5)
    assert updated == {"level1": 2, "level2": 2, "generic": 0}
    for name, state in bank._state.items():
        rows = plan.step_rows[name]
        untouched = np.setdiff1d(np.arange(len(state["weight"])), rows)
        for field, value in state.items():
            assert torch.equal(value[untouched], before[name][field][untouched]), (name, field)
        if len(rows):
            w, m, v, s = (before[name][f].clone() for f in ("weight", "exp_avg", "exp_avg_sq", "step"))
            SparseAdamW(lr=1e-2, weight_decay=0.1).update_(w, m, v, s, torch.from_numpy(rows), grads[name] * 0.5)
            assert torch.equal(state["weight"], w) and torch.equal(state["step"], s)


def test_each_layer_backward_writes_only_its_own_slice_of_one_buffer():
    bank = make_bank()
    randomize(bank)
    plan = bank.plan_step([(paths(0, 7, 9), None)])
    fetched = bank.fetch(plan, 0)
    buffers = {name: g.data_ptr() for name, g in fetched.grads.items()}
    gate, up, down = fetched.layer(1)
    (gate.sum() + up.sum() + down.sum()).backward()
    assert {name: g.data_ptr() for name, g in fetched.grads.items()} == buffers  # written in place
    for name, grads in fetched.grads.items():
        assert torch.count_nonzero(grads[0]) == 0, name  # layer 0 never ran
        if name != "generic":
            assert torch.count_nonzero(grads[1]) == grads[1].numel(), name


def test_micro_batches_add_up_to_one_batch():
    one, two = make_bank(), make_bank()
    randomize(one), randomize(two)
    p = paths(0, 7, 7, 11)
    plan = one.plan_step([(p, None)])
    fetched = one.fetch(plan, 0)
    x = [fetched.layer(i) for i in range(CFG["n_layers"])]
    (toy_loss([tuple(t[:2] for t in layer) for layer in x], 2, 0) +
     toy_loss([tuple(t[2:] for t in layer) for layer in x], 2, 1)).backward()
    one.return_grads(fetched)
    plan2 = two.plan_step([(p[:2], None), (p[2:], None)])
    for k in range(2):
        f = two.fetch(plan2, k)
        toy_loss([f.layer(i) for i in range(CFG["n_layers"])], 2, k).backward()
        two.return_grads(f)
    assert float(one.finish_grads()) == pytest.approx(float(two.finish_grads()), rel=1e-6)
    for name in plan.step_rows:
        torch.testing.assert_close(one._grads[name], two._grads[name], rtol=1e-6, atol=1e-7)


def test_init_is_the_same_for_every_layout_and_down_rows_start_at_zero():
    tables = [make_bank(t, seed=3).tables for t in sorted(TRANSPORTS)]
    for other in tables[1:]:
        assert all(torch.equal(tables[0][name], other[name]) for name in tables[0])
    for table in tables[0].values():
        assert torch.count_nonzero(table[:, :, 2]) == 0 and torch.count_nonzero(table[:, :, :2]) > 0
    assert not torch.equal(make_bank(seed=4).tables["level2"], tables[0]["level2"])


@pytest.mark.parametrize("bad, match", [
    (np.array([[2, 0, 0]]), "out of range"),
    (np.array([[0, 3, 6]]), "not a tree path"),
    (np.array([[0, 1]]), "shape"),
])
def test_paths_are_validated_on_the_host(bad, match):
    with pytest.raises(ValueError, match=match):
        make_bank().plan_step([(bad, None)])


def test_generic_needs_a_generic_row_and_trains_when_used():
    with pytest.raises(ValueError, match="generic=False"):
        make_bank(generic=False).plan_step([(paths(0), np.array([True]))])
    bank = make_bank()
    randomize(bank)
    before = bank.tables["generic"].clone()
    plan = bank.plan_step([(paths(0, 5), np.array([True, True]))])
    assert len(plan.fetches[0]["level1"].ids) == 0
    fetched = bank.fetch(plan, 0)
    toy_loss([fetched.layer(i) for i in range(CFG["n_layers"])], 2, 0).backward()
    bank.return_grads(fetched)
    bank.finish_grads()
    assert bank.step(lr=1e-2) == {"level1": 0, "level2": 0, "generic": 1}
    assert not torch.equal(bank.tables["generic"], before)


def test_gradients_cannot_be_returned_twice_or_without_a_plan():
    bank = make_bank()
    plan = bank.plan_step([(paths(0), None)])
    fetched = bank.fetch(plan, 0)
    fetched.layer(0)[0].sum().backward()
    bank.return_grads(fetched)
    with pytest.raises(ValueError, match="already returned"):
        bank.return_grads(fetched)
    with pytest.raises(RuntimeError, match="not finished"):
        bank.plan_step([(paths(0), None)])
    bank.step(lr=0.0)
    with pytest.raises(ValueError, match="planned step"):
        bank.return_grads(bank.lookup(torch.from_numpy(paths(0))))


def test_no_gradient_is_returned_after_the_reduction_started():
    # reduce_grads() issues the replicated tables' reduce-scatter (on W ranks, async): a gradient returned
    # after it would be missing from the reduced sum
    bank = make_bank("replicated")
    plan = bank.plan_step([(paths(0), None), (paths(7), None)])
    first, last = bank.fetch(plan, 0), bank.fetch(plan, 1)
    for fetched in (first, last):
        fetched.layer(0)[0].sum().backward()
    bank.return_grads(first)
    bank.reduce_grads()
    with pytest.raises(ValueError, match="after reduce_grads"):
        bank.return_grads(last)


def test_lookup_for_eval_has_no_graph():
    bank = make_bank()
    fetched = bank.lookup(torch.from_numpy(paths(1, 2)), torch.tensor([False, True]))
    gate, up, down = fetched.layer(0)
    assert gate.shape == (2, M, D) and down.shape == (2, D, M)
    assert not gate.requires_grad


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_a_lookup_plan_inside_a_step_changes_nothing_of_it(transport):
    """Validation inside training: `plan_lookup` + a no-grad fetch between a step's micro-batches reads the
    rows as `lookup` does, holds no gradient, and the step updates the bank exactly as without it."""
    banks = [make_bank(transport), make_bank(transport)]
    for bank in banks:
        randomize(bank)
    for with_lookup, bank in zip((False, True), banks):
        plan = bank.plan_step([(paths(0, 7), None), (paths(7, 11), np.array([False, True]))])
        for k in range(2):
            fetched = bank.fetch(plan, k)
            toy_loss([fetched.layer(i) for i in range(CFG["n_layers"])], 2, k).backward()
            bank.return_grads(fetched)
            if with_lookup:
                lookup = bank.plan_lookup([(paths(3, 11, 4), np.array([False, False, True]))])
                seen = bank.fetch(lookup, 0, requires_grad=False)
                expected = bank.lookup(torch.from_numpy(paths(3, 11, 4)), torch.tensor([False, False, True]))
                for i in range(CFG["n_layers"]):
                    for got, want in zip(seen.layer(i), expected.layer(i)):
                        assert not got.requires_grad and torch.equal(got, want)
                with pytest.raises(ValueError, match="requires_grad"):
                    bank.return_grads(seen)
        bank.finish_grads()
        bank.step(1e-2)
    for name, table in banks[0].tables.items():
        assert torch.equal(table, banks[1].tables[name]), name
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(banks[0]._state[name][field], banks[1]._state[name][field]), (name, field)


def test_bf16_storage_keeps_fp32_moments():
    bank = make_bank(dtype=torch.bfloat16)
    assert bank.tables["level1"].dtype == torch.bfloat16
    assert bank._state["level1"]["exp_avg"].dtype == torch.float32
    plan = bank.plan_step([(paths(0), None)])
    fetched = bank.fetch(plan, 0)
    assert fetched.layer(0)[0].dtype == torch.bfloat16
    toy_loss([tuple(t.float() for t in fetched.layer(i)) for i in range(CFG["n_layers"])], 1, 0).backward()
    bank.return_grads(fetched)
    bank.finish_grads()
    before = bank.tables["level1"][0].clone()
    bank.step(lr=1e-1)
    assert not torch.equal(bank.tables["level1"][0], before)


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_checkpoint_round_trip(tmp_path, transport):
    bank = make_bank(transport)
    randomize(bank)
    plan = bank.plan_step([(paths(0, 7), None)])
    fetched = bank.fetch(plan, 0)
    toy_loss([fetched.layer(i) for i in range(CFG["n_layers"])], 2, 0).backward()
    bank.return_grads(fetched)
    bank.finish_grads()
    bank.step(lr=1e-2)
    dcp.save({"bank": bank.state_dict()}, checkpoint_id=str(tmp_path), no_dist=True)
    fresh = make_bank(transport, seed=9)
    state = {"bank": fresh.load_template()}
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    fresh.load_state_dict(state["bank"])
    for name in bank._state:
        for field in bank._state[name]:
            assert torch.equal(fresh._state[name][field], bank._state[name][field]), (name, field)


def test_owner_placement_refuses_rows_of_another_rank():
    from hmtrain.memory.exchange import Comm

    class TwoRanks(Comm):  # the plan's routing check is pure host logic; no process group needed
        def __init__(self):
            super().__init__()
            self.world_size, self.rank = 2, 0

    bank = MemoryBank(**CFG, placement="owner", owner_of_subtree=[0, 1], comm=TwoRanks())
    assert bank.tables["level2"].shape[0] == 3  # rank 0 stores subtree 0's three level-2 rows
    with pytest.raises(RuntimeError, match="owner placement"):
        bank.plan_step([(paths(7), None)])


@pytest.mark.parametrize("kw, match", [
    (dict(units=(0, 0, 0)), "at least one level"),
    (dict(n_layers=0), "n_layers"),
    (dict(init_std=float("nan")), "init_std"),
    (dict(dtype=torch.int64), "floating point"),
    (dict(placement="scatter"), "placement"),
])
def test_constructor_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MemoryBank(**(CFG | kw))
