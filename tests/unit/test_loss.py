"""lm_loss_sum: cross-entropy from hidden states in token chunks, equal to the full-logits loss."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hmtrain.config import ModelConfig
from hmtrain.model import Transformer, lm_loss
from hmtrain.model.loss import lm_loss_sum

B, T, D, V = 3, 7, 16, 29


def make_inputs(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0] = -100  # the whole first row ignored: with chunks of <= 7 tokens, whole chunks are
    labels[2, 3] = -100
    return hidden, weight, labels


def reference(hidden, weight, labels):
    logits = (hidden.double() @ weight.double().T).flatten(0, 1)
    return F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 5, 21, 64])
def test_matches_cross_entropy_on_full_logits(chunk_tokens):
    hidden, weight, labels = make_inputs(seed=0)
    loss, count = lm_loss_sum(hidden, weight, labels, chunk_tokens=chunk_tokens)
    assert loss.dtype == torch.float32 and count.dtype == torch.int64 and count.dim() == 0
    assert int(count) == int((labels != -100).sum()) == 13
    grads = torch.autograd.grad(0.37 * loss, (hidden, weight))  # a grad_output other than 1
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    expect = reference(h64, w64, labels)
    expect_grads = torch.autograd.grad(0.37 * expect, (h64, w64))
    torch.testing.assert_close(loss.double(), expect, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads, expect_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert grads[0][0].abs().max() == 0  # ignored tokens get no gradient


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, labels = make_inputs(seed=1)
    loss, count = lm_loss_sum(hidden, weight, torch.full_like(labels, -100), chunk_tokens=4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(count) == 0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_bf16_inputs_are_close_to_an_fp32_reference():
    hidden, weight, labels = make_inputs(seed=2)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    loss, _ = lm_loss_sum(h16, w16, labels, chunk_tokens=5)
    loss.backward()
    assert loss.dtype == torch.float32 and h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    expect = reference(hidden, weight, labels)
    expect.backward()
    torch.testing.assert_close(loss.double(), expect, rtol=2e-2, atol=0)
    for got, want in ((h16.grad, hidden.grad), (w16.grad, weight.grad)):
        err = (got.double() - want.double()).abs().max() / want.abs().max()
        assert err < 2e-2, err


def test_autocast_runs_the_head_in_bf16_with_fp32_gradients():
    hidden, weight, labels = make_inputs(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = lm_loss_sum(hidden, weight, labels, chunk_tokens=4)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert all(g.dtype == torch.float32 for g in grads)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    expect = reference(h64, w64, labels)
    expect_grads = torch.autograd.grad(expect, (h64, w64))
    assert abs(loss.double() - expect) / expect < 2e-2
    # bf16 logits: close to the exact gradient, but not equal to fp32's
    for got, want in zip(grads, expect_grads):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert 1e-5 < err < 2e-2, err


def test_frozen_weight_and_no_grad():
    hidden, weight, labels = make_inputs(seed=4)
    weight.requires_grad_(False)
    loss, _ = lm_loss_sum(hidden, weight, labels, chunk_tokens=4)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        again, _ = lm_loss_sum(hidden, weight, labels, chunk_tokens=4)
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach())


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_a_chunk_of_logits():
    n_tokens, d, chunk = 64, 4, 4  # so that N x V dwarfs V x d and N x d
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, n_tokens, d, generator=gen).requires_grad_()
    weight = torch.randn(V, d, generator=gen).requires_grad_()
    labels = torch.randint(0, V, (1, n_tokens), generator=gen)
    plain, chunked = LargestTensor(), LargestTensor()
    with plain:  # the recorder does see the full logits of the plain path
        lm_loss(hidden @ weight.T, labels, reduction="sum").backward()
    with chunked:
        lm_loss_sum(hidden, weight, labels, chunk_tokens=chunk)[0].backward()
    assert plain.largest == n_tokens * V
    assert chunked.largest == max(chunk * V, V * d, n_tokens * d)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_model_hidden_states_and_head_give_the_full_loss_and_grads(tie):
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=24,
                      rope_base=1e4, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=16)
    assert (model.output_weight is model.tok_embeddings.weight) == tie
    assert model.output_weight is model.output.weight
    gen = torch.Generator().manual_seed(6)
    tokens, labels = torch.randint(0, V, (2, 9), generator=gen), torch.randint(0, V, (2, 9), generator=gen)
    labels[1, 5:] = -100
    segments = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    hidden = model.hidden_states(tokens, segments=segments)
    torch.testing.assert_close(model.output(hidden), model(tokens, segments=segments))
    loss, count = lm_loss_sum(hidden, model.output_weight, labels, chunk_tokens=5)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expect = lm_loss(model(tokens, segments=segments), labels, reduction="sum")
    expect.backward()
    torch.testing.assert_close(loss, expect)
    assert int(count) == 2 * 9 - 4
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_shapes_are_named():
    hidden, weight, labels = make_inputs(seed=7)
    with pytest.raises(ValueError, match=r"labels must be \[B, T\] = \(3, 7\), got \(3, 6\)"):
        lm_loss_sum(hidden, weight, labels[:, :6])
    with pytest.raises(ValueError, match="weight \\[V, d\\]"):
        lm_loss_sum(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        lm_loss_sum(hidden, weight, labels, chunk_tokens=0)
