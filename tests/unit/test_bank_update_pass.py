"""The bank's sparse AdamW runs one pass over every touched table (issue 15, item 12), bit-identical to
updating each table alone.

Counts the ops `bank.step()` dispatches through a dispatch mode (no timing): the update's arithmetic is a
fixed number of torch._foreach_* ops per pass, whatever the number of tables or rows, and rows that form a
run of consecutive ids are updated in place (no gather, no scatter of a row)."""
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hmtrain.memory.sparse_adamw as sparse_adamw
from hmtrain.memory import MemoryBank
from hmtrain.memory.indices import DeviceIndices
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.memory.sparse_adamw import Rows, sparse_adamw_tables_

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


class Ops(TorchDispatchMode):
    """Names of the ops dispatched while on, and which of them read or write a tensor of at least `big` values."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.names, self.on_rows = big, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.append(name)
        flat = [a for x in list(args) + list((kwargs or {}).values()) for a in (x if isinstance(x, (list, tuple))
                                                                              else [x])]
        if any(isinstance(a, torch.Tensor) and a.numel() >= self.big for a in flat):
            self.on_rows.append(name)
        return func(*args, **(kwargs or {}))


def reference_update_(weight, exp_avg, exp_avg_sq, step, rows, grads, master=None, *, lr, betas, eps, weight_decay):
    """One table, as sparse AdamW ran before its tables shared a pass (gather, fp32 math, scatter)."""
    beta1, beta2 = betas
    w = (master if master is not None else weight).index_select(0, rows).float()
    m, v, t = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows), step.index_select(0, rows) + 1
    g = grads.float()
    w.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bshape = (-1,) + (1,) * (weight.ndim - 1)
    td = t.to(torch.float64)
    step_size = (lr / (1.0 - beta1**td)).to(torch.float32).view(bshape)
    bc2_sqrt = (1.0 - beta2**td).sqrt().to(torch.float32).view(bshape)
    w.sub_(step_size * m / ((v.sqrt() / bc2_sqrt).add_(eps)))
    weight.index_copy_(0, rows, w.to(weight.dtype))
    if master is not None:
        master.index_copy_(0, rows, w)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    step.index_copy_(0, rows, t)


def table(shape, dtype, master: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    state = {"weight": w.to(dtype), "exp_avg": torch.randn(shape, generator=gen) * 1e-2,
             "exp_avg_sq": torch.rand(shape, generator=gen) * 1e-4,
             "step": torch.randint(0, 5, (shape[0],), generator=gen)}
    if master:
        state["master"] = w.clone()
    return state


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_one_pass_over_tables_is_bit_identical_to_each_table_alone(dtype, master, monkeypatch):
    shapes = [(6, 2, 3), (9, 5), (1, 4, 2, 2)]
    touched = [[4, 1, 3], [2, 3, 4, 5], [0]]  # scattered (gathered), a run, the one row (a run)
    runs = [None, (2, 6), (0, 1)]
    monkeypatch.setattr(sparse_adamw, "_CHUNK_ELEMENTS", 16)  # several pieces, and passes, per table
    ours = [table(s, dtype, master, i) for i, s in enumerate(shapes)]
    theirs = [{k: v.clone() for k, v in t.items()} for t in ours]
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(len(r), *s[1:], generator=gen) for r, s in zip(touched, shapes)]
        tables = [Rows(t["weight"], t["exp_avg"], t["exp_avg_sq"], t["step"], torch.tensor(r), g, t.get("master"), run)
                  for t, r, g, run in zip(ours, touched, grads, runs)]
        sparse_adamw_tables_(tables, **HP)
        for t, r, g in zip(theirs, touched, grads):
            reference_update_(t["weight"], t["exp_avg"], t["exp_avg_sq"], t["step"], torch.tensor(r), g,
                              t.get("master"), **HP)
    for a, b in zip(ours, theirs):
        for field in a:
            assert torch.equal(a[field], b[field]), field


def test_passes_follow_the_chunk_size_not_the_number_of_tables(monkeypatch):
    def passes(n_tables: int, chunk: int) -> int:
        monkeypatch.setattr(sparse_adamw, "_CHUNK_ELEMENTS", chunk)
        tables = [table((4, 3), torch.float32, False, i) for i in range(n_tables)]
        rows = [Rows(t["weight"], t["exp_avg"], t["exp_avg_sq"], t["step"], torch.tensor([0, 2]),
                     torch.ones(2, 3)) for t in tables]
        return sparse_adamw_tables_(rows, **HP)

    assert passes(1, 1 << 24) == passes(5, 1 << 24) == 1
    assert passes(5, 12) == 3  # 6 values a table, 12 a pass


def bank_step_ops(paths: np.ndarray, use_generic: np.ndarray, **kw) -> Ops:
    bank = MemoryBank(n_layers=2, kind=SwiGLUUnits(d_model=8), branching=[4, 4], units=[4, 2], generic=True, **kw)
    plan = bank.plan_step([(paths, use_generic)])
    memory = bank.fetch(plan, 0)
    sum(sum((t * 1.5).sum() for t in memory.layer(i)) for i in range(2)).backward()
    bank.return_grads(memory)
    bank.finish_grads()
    ops = Ops(big=math.prod(bank.spec["level2"].row_shape))
    with ops:
        bank.step(1e-2)
    return ops


def foreach(ops: Ops) -> list[str]:
    return [name for name in ops.names if name.startswith("_foreach_")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_launches_the_same_update_kernels_for_one_table_or_three(dtype):
    one = bank_step_ops(np.array([[1, 5]]), np.array([True]), dtype=dtype)  # the generic row only
    three = bank_step_ops(np.array([[1, 5], [1, 5]]), np.array([True, False]), dtype=dtype)  # and a row of each level
    scattered = bank_step_ops(np.array([[0, 1], [1, 6], [3, 15], [3, 12]]), np.array([False] * 4), dtype=dtype)
    assert foreach(one) == foreach(three) == foreach(scattered)
    assert len(foreach(one)) == 11
    # a touched row that is a run is updated in place: no gather or scatter of it; a bf16 table writes its
    # rows once, rounded from the fp32 masters
    assert three.on_rows.count("index_select") == three.on_rows.count("index_copy_") == 0
    assert three.on_rows.count("copy_") == (3 if dtype == torch.bfloat16 else 0)
    # rows 1 and 3 of level 1 are not a run: gathered and scattered back as before
    assert scattered.on_rows.count("index_select") > 0 and scattered.on_rows.count("index_copy_") > 0


def test_device_indices_read_runs_as_slices():
    arrays = {"run": np.array([3, 4, 5]), "gap": np.array([3, 5]), "down": np.array([5, 4]), "empty": np.zeros(0),
              "one": np.array([2])}
    idx = DeviceIndices(arrays, torch.device("cpu"))
    assert [idx.run(k) for k in arrays] == [(3, 6), None, None, None, (2, 3)]
    source = torch.arange(24.0).view(8, 3)
    for key in arrays:
        assert torch.equal(idx.take(source, key), source.index_select(0, idx[key]))
        ours, theirs = torch.zeros(8, 3), torch.zeros(8, 3)
        values = torch.randn(3, len(arrays[key])).t()  # a strided view
        idx.put(ours, key, values)
        theirs.index_copy_(0, idx[key], values)
        assert torch.equal(ours, theirs)
    assert idx.take(source, "run").data_ptr() == source[3].data_ptr()  # a view, no copy
