"""A bank split over tensor-parallel ranks (hmtrain/memory/unit_split.py), on one process: rank r's bank holds
units r*m/N .. of every row, starts as that slice of the whole bank, and the sum of the ranks' memory FFN
partial outputs trains each slice exactly as the whole bank trains it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmtrain.memory.bank import MemoryBank
from hmtrain.memory.exchange import Comm
from hmtrain.memory.kind import LoRA, SwiGLUUnits
from hmtrain.memory.sparse_adamw import SparseAdamW
from hmtrain.memory.unit_split import UnitSplit

D, N = 4, 2
CFG = dict(n_layers=2, kind=SwiGLUUnits(d_model=D), branching=(2, 3), units=(4, 2), generic=True, seed=3)


def bank(rank=None, **kw) -> MemoryBank:
    split = None if rank is None else UnitSplit(rank, N, Comm(), mesh=None)  # no checkpoint here: no mesh
    return MemoryBank(**(CFG | kw), optimizer=SparseAdamW(lr=1e-2, weight_decay=0.1), unit_split=split)


def halves(table: torch.Tensor, rank: int) -> torch.Tensor:
    units = table.shape[3] // N
    return table.narrow(3, rank * units, units)


def test_a_rank_starts_with_its_slice_of_the_whole_bank_and_counts_the_whole():
    whole, ranks = bank(), [bank(r) for r in range(N)]
    for r, split in enumerate(ranks):
        assert split.units == (2, 1) and split.units_total == 3
        for name, table in whole.tables.items():
            torch.testing.assert_close(split.tables[name], halves(table, r), rtol=0, atol=0)
        assert split.num_parameters() == whole.num_parameters()  # the bank's size, over its ranks
        assert split.fetched_parameters() == whole.fetched_parameters()


def memory_output(memory, x: torch.Tensor) -> torch.Tensor:
    """Every layer's memory FFN on x: one rank's partial output (its units), or the whole."""
    out = torch.zeros(())
    for layer in range(CFG["n_layers"]):
        gate, up, down = memory.layer(layer)
        y = (F.silu(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))) @ down.transpose(1, 2)
        out = out + (y * x).sum() + 0.1 * (gate * up).sum()  # the gate*up term: gate rows learn at step 0
    return out


def test_the_ranks_partial_outputs_train_each_slice_as_the_whole_bank_trains_it():
    whole, ranks = bank(), [bank(r) for r in range(N)]
    gen = torch.Generator().manual_seed(0)
    for table in whole.tables.values():  # non-zero down rows, so every slot gets a gradient
        table.copy_(torch.randn(table.shape, generator=gen))
    for r, split in enumerate(ranks):
        for name, table in split.tables.items():
            table.copy_(halves(whole.tables[name], r))
    batches = [(np.array([[0, 1], [1, 4], [0, 2]]), np.array([False, False, True])),
               (np.array([[1, 5], [0, 0], [1, 3]]), np.array([True, False, False]))]
    for paths, use_generic in batches:
        x = torch.randn(len(paths), 3, D, generator=gen)
        fetched = {}
        for name, b in [("whole", whole)] + [(r, split) for r, split in enumerate(ranks)]:
            fetched[name] = b.fetch(b.plan_step([(paths, use_generic)]), 0)
        memory_output(fetched["whole"], x).backward()
        sum(memory_output(fetched[r], x) for r in range(N)).backward()  # the row-parallel sum
        for name, b in [("whole", whole)] + [(r, split) for r, split in enumerate(ranks)]:
            b.return_grads(fetched[name])
        sq = [b.finish_grads() for b in [whole, *ranks]]
        torch.testing.assert_close(sq[1] + sq[2], sq[0])  # disjoint slices: the squared norms add up
        for b in [whole, *ranks]:
            b.step(lr=1e-2)
    for r, split in enumerate(ranks):
        for name, table in whole.tables.items():
            torch.testing.assert_close(split.tables[name], halves(table, r), rtol=1e-5, atol=1e-6)


def test_units_that_do_not_split_and_kinds_of_several_widths_are_refused():
    with pytest.raises(ValueError, match="3 units do not split over 2 tensor-parallel ranks"):
        bank(0, units=(3, 2))
    lora = LoRA(name="lora_ffn", targets=(("w_up", D, 8),))
    with pytest.raises(ValueError, match="memory.kind=lora_ffn: only a kind of one slot width"):
        bank(0, kind=lora)
