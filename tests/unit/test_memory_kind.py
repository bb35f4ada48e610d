"""The memory kind: shapes and sizes of the paper's banks, one layer's tensors from a row, a fresh memory."""
import dataclasses

import numpy as np
import pytest
import torch

from hmtrain.config import ModelConfig, load_config
from hmtrain.memory import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits, memory_kind
from hmtrain.memory.sizes import level_nodes
from hmtrain.model import Transformer


@pytest.mark.parametrize("preset, bank, fetched", [
    ("paper-160m", 4_624_220_160, 18_063_360),
    ("paper-410m", 12_683_575_296, 49_545_216),
    ("paper-1.4b", 21_139_292_160, 153_354_240),
])
def test_paper_presets_sizes_from_the_kinds_row_shape(preset, bank, fetched):
    cfg = load_config(preset)
    kind = memory_kind(cfg)
    assert kind == SwiGLUUnits(d_model=cfg.model.d_model) and kind.params_per_unit == 3 * cfg.model.d_model
    n_layers, units = cfg.model.n_layers, cfg.memory.units
    rows = [(nodes, kind.row_shape(n_layers, m)) for nodes, m in zip(level_nodes(cfg.tree.branching), units)]
    assert sum(nodes * int(np.prod(shape)) for nodes, shape in rows) == bank
    assert int(np.prod(kind.row_shape(n_layers, sum(units)))) == fetched == n_layers * kind.params_per_unit * sum(units)


def test_row_shape_is_layers_slots_units_width():
    kind = SwiGLUUnits(d_model=8)
    assert kind.slots == ("gate", "up", "down") and kind.width == 8
    assert kind.row_shape(3, 5) == (3, 3, 5, 8)
    bank = MemoryBank(n_layers=3, kind=kind, branching=(2, 3), units=(5, 2), generic=True)
    assert {name: tuple(t.shape) for name, t in bank.tables.items()} == {
        "level1": (2, 3, 3, 5, 8), "level2": (6, 3, 3, 2, 8), "generic": (1, 3, 3, 7, 8)}
    assert bank.num_parameters(include_generic=False) == 3 * 24 * (2 * 5 + 6 * 2)
    assert bank.fetched_parameters() == 3 * 24 * 7


def test_memory_kind_refuses_a_kind_it_does_not_know():
    cfg = load_config("tiny")
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, kind="lora"))
    with pytest.raises(ValueError, match="memory.kind must be one of ffn, .* or kv, got 'lora'"):
        memory_kind(cfg)
    with pytest.raises(ValueError, match="d_model must be a positive int, got 0"):
        SwiGLUUnits(d_model=0)


def test_layer_tensors_round_trip_a_row():
    """A sequence's layer-i tensors are its rows' slots (down transposed); stacking them back gives the rows."""
    kind = SwiGLUUnits(d_model=4)
    bank = MemoryBank(n_layers=2, kind=kind, branching=(2, 3), units=(3, 2), generic=True)
    gen = torch.Generator().manual_seed(0)
    for table in bank.tables.values():
        table.copy_(torch.randn(table.shape, generator=gen))
    paths = torch.tensor([[1, 4], [0, 2]])
    fetched = bank.lookup(paths, torch.tensor([False, True]))
    for i in range(2):
        gate, up, down = fetched.layer(i)
        assert gate.shape == up.shape == (2, 5, 4) and down.shape == (2, 4, 5)
        back = torch.stack([gate, up, down.transpose(1, 2)], dim=1)  # [B, slots, M, d]
        own = torch.cat([bank.tables["level1"][1, i], bank.tables["level2"][4, i]], dim=1)
        assert torch.equal(back[0], own)  # sequence 0: its path's level blocks, side by side
        assert torch.equal(back[1], bank.tables["generic"][0, i])  # sequence 1: the generic row
    layer = bank.tables["level2"][5, 1]  # one row's layer 1: [slots, m, d]
    gate, up, down = kind.layer_tensors([layer[slot][None] for slot in range(len(kind.slots))])
    assert torch.equal(gate[0], layer[0]) and torch.equal(up[0], layer[1]) and torch.equal(down[0], layer[2].T)


TINY = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fresh_memory_changes_nothing_at_step_0(dtype):
    torch.manual_seed(0)
    model = Transformer(TINY, max_seq_len=16).eval()
    bank = MemoryBank(n_layers=2, kind=SwiGLUUnits(d_model=16), branching=(2, 2), units=(3, 2), generic=True,
                      init_std=0.5, seed=3, dtype=dtype)
    for table in bank.tables.values():  # gate and up drawn like the anchor's, down zero
        assert table[:, :, 0:2].float().std() > 0.3 and not table[:, :, 2].any()
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    memory = bank.lookup(torch.tensor([[0, 1], [1, 3], [1, 2]]), torch.tensor([False, False, True]))
    with torch.no_grad():
        alone = model(tokens)
        assert torch.equal(model(tokens, memory=memory), alone)
        for table in bank.tables.values():  # the same memory with non-zero down rows does change the output
            table[:, :, 2] = 0.1
        changed = bank.lookup(torch.tensor([[0, 1], [1, 3], [1, 2]]), torch.tensor([False, False, True]))
        assert not torch.allclose(model(tokens, memory=changed), alone)
