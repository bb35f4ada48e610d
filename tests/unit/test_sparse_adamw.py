"""Row-wise AdamW: equals torch.optim.AdamW when every row is touched; untouched rows stay put."""

import pytest
import torch

from hmtrain.memory.sparse_adamw import SparseAdamW, sparse_adamw_

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _state(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    return w, torch.zeros(shape), torch.zeros(shape), torch.zeros(shape[0], dtype=torch.int64)


def test_matches_torch_adamw_when_all_rows_touched():
    shape = (5, 3, 4)
    w, m, v, t = _state(shape)
    ref = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([ref], foreach=False, **HP)
    gen = torch.Generator().manual_seed(1)
    rows = torch.arange(shape[0])
    for _ in range(6):
        g = torch.randn(shape, generator=gen)
        ref.grad = g.clone()
        opt.step()
        sparse_adamw_(w, m, v, t, rows, g, **HP)
    torch.testing.assert_close(w, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert t.tolist() == [6] * shape[0]


def test_untouched_rows_bit_identical_and_lazy_bias_correction():
    shape = (6, 2, 3)
    w, m, v, t = _state(shape)
    opt = SparseAdamW(**HP)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # rows 0 and 3 get some history first
        opt.update_(w, m, v, t, torch.tensor([0, 3]), torch.randn(2, 2, 3, generator=gen))
    before = [x.clone() for x in (w, m, v, t)]
    rows = torch.tensor([4, 1, 3])  # unsorted on purpose
    g = torch.randn(3, 2, 3, generator=gen)
    opt.update_(w, m, v, t, rows, g)
    untouched = torch.tensor([0, 2, 5])
    for new, old in zip((w, m, v, t), before):
        assert torch.equal(new[untouched], old[untouched])
    for r in rows.tolist():
        assert not torch.equal(w[r], before[0][r])
    assert t.tolist() == [3, 1, 0, 4, 1, 0]
    # a fresh row's first step equals a dense AdamW's first step on that row alone
    ref = torch.nn.Parameter(before[0][4].clone())
    dense = torch.optim.AdamW([ref], foreach=False, **HP)
    ref.grad = g[0].clone()
    dense.step()
    torch.testing.assert_close(w[4], ref.detach(), rtol=1e-6, atol=1e-7)


def test_bf16_weights_use_fp32_math():
    w, m, v, t = _state((3, 4))
    wb = w.to(torch.bfloat16)
    g = torch.ones(2, 4)
    sparse_adamw_(wb, m, v, t, torch.tensor([0, 2]), g, **HP)
    assert wb.dtype == torch.bfloat16
    assert torch.equal(wb[1], w.to(torch.bfloat16)[1])
    assert m.dtype == torch.float32 and float(m[0, 0]) == pytest.approx(0.1)


def test_large_rows_are_chunked_consistently(monkeypatch):
    import hmtrain.memory.sparse_adamw as mod

    w, m, v, t = _state((7, 5))
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    rows = torch.arange(7)
    full = [x.clone() for x in (w, m, v, t)]
    sparse_adamw_(*full, rows, g, **HP)
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 10)  # 2 rows per chunk
    sparse_adamw_(w, m, v, t, rows, g, **HP)
    for a, b in zip((w, m, v, t), full):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "rows, grads, match",
    [
        (torch.tensor([0, 0]), torch.zeros(2, 2), "unique"),
        (torch.tensor([0, 9]), torch.zeros(2, 2), r"rows must lie in \[0, 4\)"),
        (torch.tensor([0, 1]), torch.zeros(3, 2), "grads must have shape"),
        (torch.tensor([0.0, 1.0]), torch.zeros(2, 2), "int64"),
    ],
)
def test_bad_inputs(rows, grads, match):
    w, m, v, t = _state((4, 2))
    with pytest.raises(ValueError, match=match):
        sparse_adamw_(w, m, v, t, rows, grads, **HP)


@pytest.mark.parametrize(
    "hp, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-1e-3), "weight_decay"),
    ],
)
def test_bad_hparams(hp, match):
    with pytest.raises(ValueError, match=match):
        SparseAdamW(**hp)
