"""The block gather's kernels per micro-batch do not grow with the number of layers (issue 15, item 12).

Counts the non-view aten ops (kernels on a device) that building every layer's memory blocks and their
backward (GatherBlocks.backward, however many times autograd calls it) dispatch, through a dispatch mode."""
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hmtrain.memory import MemoryBank
from hmtrain.memory.gather import GatherBlocks
from hmtrain.memory.kind import SwiGLUUnits


class KernelCounter(TorchDispatchMode):
    """Counts dispatched ops that compute (in-place ones included), not those that only make a view."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aliases = [r.alias_info for r in func._schema.returns]
        if not any(a is not None and not a.is_write for a in aliases):
            self.count += 1
        return func(*args, **(kwargs or {}))


def gather_kernels(n_layers: int, monkeypatch) -> tuple[int, int]:
    """(forward kernels, backward kernels) of the block gather for one micro-batch of `n_layers` layers."""
    bank = MemoryBank(n_layers=n_layers, kind=SwiGLUUnits(d_model=8), branching=[4, 4], units=[4, 2], generic=True)
    leaves = np.array([0, 3, 3, 9, 15, 6])
    paths = np.stack([leaves // 4, leaves], axis=1)
    plan = bank.plan_step([(paths, np.array([False, False, True, False, True, False]))])
    fetched = bank.fetch(plan, 0, padded_to=8)
    forward, backward = KernelCounter(), KernelCounter()
    original = GatherBlocks.backward

    def counted(ctx, *grads):
        with backward:
            return original(ctx, *grads)

    monkeypatch.setattr(GatherBlocks, "backward", staticmethod(counted))
    with forward:
        layers = [fetched.layer(i) for i in range(n_layers)]
    sum((gate * 1.5).sum() + (up * 0.5).sum() + (down * 2.0).sum() for gate, up, down in layers).backward()
    bank.abandon_step()
    return forward.count, backward.count


def test_the_block_gather_launches_the_same_kernels_for_2_and_12_layers(monkeypatch):
    assert gather_kernels(2, monkeypatch) == gather_kernels(12, monkeypatch)


def test_the_gathered_blocks_are_each_sequences_rows_and_their_gradients_sum_per_row():
    bank = MemoryBank(n_layers=3, kind=SwiGLUUnits(d_model=4), branching=[2, 2], units=[2, 1], generic=True,
                      init_std=0.5)
    for table in bank.tables.values():
        table.normal_()
    paths = np.array([[0, 1], [1, 2], [0, 1]])
    plan = bank.plan_step([(paths, np.array([False, True, False]))])
    fetched = bank.fetch(plan, 0, padded_to=4)
    gate, up, down = fetched.layer(2)
    level1, level2, generic = (bank.tables[n] for n in ("level1", "level2", "generic"))
    expect = torch.cat([level1[0, 2, 0], level2[1, 2, 0]])  # sequence 0's gate units in layer 2
    assert torch.equal(gate[0], expect) and torch.equal(gate[2], expect)
    assert torch.equal(gate[1], generic[0, 2, 0]) and torch.count_nonzero(gate[3]) == 0  # generic, padding
    (gate * torch.arange(4.0).view(4, 1, 1)).sum().backward()
    # level 1 row 0 is used by sequences 0 and 2: its gate gradient in layer 2 is 0 + 2 per value
    assert torch.equal(fetched.grads["level1"][2, 0, 0], torch.full((2, 4), 2.0))
    assert torch.equal(fetched.grads["generic"][2, 0, 0], torch.full((3, 4), 1.0))
    assert torch.count_nonzero(fetched.grads["level1"][:2]) == 0  # other layers untouched
