"""A bf16 bank trains like an fp32 one: fp32 master rows, fp32 row gradients, masters in checkpoints."""

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.memory.bank import MemoryBank
from hmtrain.memory.sparse_adamw import SparseAdamW
from tests.unit.test_bank import CFG, TRANSPORTS, paths

LEAVES = paths(*range(12))  # every level-1 and level-2 row, each shared by several sequences
GENERIC = np.arange(12) % 4 == 0  # and the generic row
MASTER = "master"  # a bf16 table's fp32 master rows: its state field and `<table>.master` in checkpoints


def make_bank(dtype, transport="remote", **kw) -> MemoryBank:
    # the paper's memory-phase optimizer at its final learning rate
    optimizer = SparseAdamW(lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-3)
    return MemoryBank(**(CFG | TRANSPORTS[transport] | {"optimizer": optimizer, "dtype": dtype} | kw))


def coefficients(step: int, batch: int) -> list[torch.Tensor]:
    """d(loss)/d(block) per layer and slot: a fixed direction plus noise, as a consistent signal gives."""
    gen = torch.Generator().manual_seed(1000 + step)
    base = torch.Generator().manual_seed(7)
    shape = (batch, 3, 5, 4)  # sequences, slots (gate, up, down^T), M units, d
    return [torch.randn(shape, generator=base) + 0.5 * torch.randn(shape, generator=gen) for _ in range(2)]


def train_step(bank: MemoryBank, step: int) -> None:
    """One step whose block gradients do not depend on the weights, so both banks see the same ones."""
    plan = bank.plan_step([(LEAVES, GENERIC)])
    fetched = bank.fetch(plan, 0)
    loss = torch.zeros(())
    for i, c in enumerate(coefficients(step, len(LEAVES))):
        gate, up, down = fetched.layer(i)
        loss = loss + (gate.float() * c[:, 0]).sum() + (up.float() * c[:, 1]).sum()
        loss = loss + (down.transpose(1, 2).float() * c[:, 2]).sum()
    loss.backward()
    bank.return_grads(fetched)
    bank.finish_grads()
    bank.step(lr=bank.optimizer.lr)


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_a_bf16_bank_tracks_an_fp32_bank_over_100_steps_at_lr_1e_5(transport):
    fp32, bf16 = make_bank(torch.float32, transport), make_bank(torch.bfloat16, transport)
    start32 = {name: t.clone() for name, t in fp32.tables.items()}
    start16 = {name: t.float() for name, t in bf16.tables.items()}
    for step in range(100):
        train_step(fp32, step)
        train_step(bf16, step)
    for name in fp32.tables:
        moved32 = fp32.tables[name] - start32[name]
        moved16 = bf16.tables[name].float() - start16[name]
        # the stored bf16 rows follow the fp32 ones up to their own rounding (half a bf16 ulp of a 0.02
        # weight is 6e-5, 100 steps move it about 1e-3): 4-5% here. Rounding every update back to bf16
        # (no masters) leaves about half the elements where they started and is off by 75%.
        error = ((moved16 - moved32).norm() / moved32.norm()).item()
        assert error < 0.1, f"{name}: the bf16 rows' displacement is off by {error:.0%} of the fp32 rows'"
        master = bf16._state[name][MASTER]
        assert torch.equal(master.to(torch.bfloat16), bf16.tables[name])  # stored rows = rounded masters
        # the masters follow the fp32 bank up to the bf16 rounding of the block gradients (2^-9 relative)
        torch.testing.assert_close(master - start32[name], moved32, rtol=0, atol=1e-2 * moved32.abs().max().item())


def test_row_gradients_accumulate_in_fp32_within_a_micro_batch():
    bank = make_bank(torch.bfloat16)
    batch = 64  # 32 on one leaf, 32 on the generic row: per row one large gradient and 31 small ones
    p, generic = paths(*[5] * batch), np.arange(batch) % 2 == 1
    plan = bank.plan_step([(p, generic)])
    fetched = bank.fetch(plan, 0)
    scale = torch.full((batch, 1, 1), 1e-3)
    scale[:2] = 1.0  # sequence 0 uses the leaf's rows, sequence 1 the generic row
    gate, _, _ = fetched.layer(0)
    (gate.float() * scale).sum().backward()
    # each row's gradient in exact arithmetic: 1 + 31 * 1e-3 in bf16, summed in float64. A bf16 buffer
    # is off by its rounding of the sum (2.6e-4 here, on CPU) or, where every add rounds (GPU atomics
    # in bf16), by all 31 small terms (3%)
    per_sequence = scale.to(torch.bfloat16).double()
    own, shared = per_sequence[~generic].sum(), per_sequence[generic].sum()
    level2 = fetched.grads["level2"][0, 0, 0]  # layer 0, the one fetched row, slot gate
    torch.testing.assert_close(level2.double(), own.expand_as(level2), rtol=1e-6, atol=0)
    generic_row = fetched.grads["generic"][0, 0, 0]
    torch.testing.assert_close(generic_row.double(), shared.expand_as(generic_row), rtol=1e-6, atol=0)
    assert level2.dtype == generic_row.dtype == torch.float32
    bank.return_grads(fetched)  # and they travel to the step's buffer as they are
    assert torch.equal(bank._grads["level2"][0, 0, 0], level2)


def test_a_bf16_checkpoint_holds_the_masters_and_resumes_bit_exactly(tmp_path):
    straight, saved = make_bank(torch.bfloat16), make_bank(torch.bfloat16)
    for step in range(3):
        train_step(straight, step)
        train_step(saved, step)
    state = saved.state_dict()
    assert state["level1.master"].dtype == torch.float32
    dcp.save({"bank": state}, checkpoint_id=str(tmp_path), no_dist=True)
    resumed = make_bank(torch.bfloat16, seed=9)
    template = {"bank": resumed.load_template()}
    dcp.load(template, checkpoint_id=str(tmp_path), no_dist=True)
    resumed.load_state_dict(template["bank"])
    for step in range(3, 6):
        train_step(straight, step)
        train_step(resumed, step)
    for name, fields in straight._state.items():
        for field, value in fields.items():
            assert torch.equal(resumed._state[name][field], value), (name, field)


def test_a_bf16_checkpoint_from_before_masters_loads_them_from_its_rows(tmp_path):
    old = make_bank(torch.bfloat16)
    train_step(old, 0)
    rows = {k: v for k, v in old.state_dict().items() if not k.endswith(f".{MASTER}")}  # what format 2 saved
    Checkpointer(tmp_path).write(1, {"bank": rows}, {"format": 2, "loader": {}}, "")
    bank = make_bank(torch.bfloat16, seed=9)
    state = {"bank": bank.load_template()}
    Checkpointer.load(tmp_path / "step_00000001", state)
    bank.load_state_dict(state["bank"])
    for name in bank.tables:
        assert torch.equal(bank.tables[name], old.tables[name])
        assert torch.equal(bank._state[name][MASTER], old.tables[name].float())
    # a checkpoint of today's format must hold them: a missing master is an error, not a fresh start
    Checkpointer(tmp_path).write(2, {"bank": rows}, {"format": 3, "loader": {}}, "")
    with pytest.raises(Exception, match="master"):
        Checkpointer.load(tmp_path / "step_00000002", {"bank": bank.load_template()})
