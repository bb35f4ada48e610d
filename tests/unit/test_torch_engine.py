"""The anchor's torch engine: one global norm clips anchor and bank alike; phase reset; frozen anchor."""
import pytest
import torch

from hmtrain.config import ModelConfig, OptimConfig
from hmtrain.model import Transformer
from hmtrain.parallel.torch_engine import TorchEngine

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, head_dim=8, ffn_hidden=24)


def engine_with_grads(seed=0) -> TorchEngine:
    torch.manual_seed(seed)
    model = Transformer(CFG, max_seq_len=8)
    tokens = torch.randint(0, 64, (2, 8))
    loss, _ = model(tokens, labels=tokens)
    loss.backward()
    return TorchEngine(model, OptimConfig(lr=1e-3), torch.device("cpu"))


def grads_seen_by_the_optimizer(engine: TorchEngine, total_norm: float, max_norm: float) -> list[torch.Tensor]:
    seen = []
    original = engine.optimizer.step

    def capture(*args, **kwargs):
        seen.extend(p.grad.clone() for p in engine.model.parameters() if p.grad is not None)
        return original(*args, **kwargs)

    engine.optimizer.step = capture
    engine.step(1e-3, torch.tensor(total_norm), max_norm)
    return seen


def test_grads_are_scaled_by_the_global_norm_not_the_anchors_own():
    engine = engine_with_grads()
    before = [p.grad.clone() for p in engine.model.parameters() if p.grad is not None]
    own = float(engine.grad_sq_norm().sqrt())
    total = 4.0 * own  # the bank's gradients make the global norm 4x the anchor's
    seen = grads_seen_by_the_optimizer(engine, total, max_norm=own)  # clip to the anchor's own norm
    for b, s in zip(before, seen):
        torch.testing.assert_close(s, b * own / (total + 1e-6))
    assert all(p.grad is None for p in engine.model.parameters())  # zeroed after the step


def test_no_clipping_below_the_threshold_or_when_disabled():
    for max_norm, total in ((10.0, 1.0), (0.0, 100.0)):
        engine = engine_with_grads()
        before = [p.grad.clone() for p in engine.model.parameters() if p.grad is not None]
        seen = grads_seen_by_the_optimizer(engine, total, max_norm)
        assert all(torch.equal(b, s) for b, s in zip(before, seen))


def test_reset_starts_fresh_moments_with_the_phase_settings():
    engine = engine_with_grads()
    engine.step(1e-3, engine.grad_sq_norm().sqrt(), 1.0)
    assert engine.optimizer.state
    engine.reset(OptimConfig(lr=1e-4, weight_decay=1e-3))
    assert not engine.optimizer.state
    assert [g["weight_decay"] for g in engine.optimizer.param_groups] == [pytest.approx(1e-3), 0.0]


def test_frozen_anchor_has_no_gradients():
    engine = engine_with_grads()
    engine.zero_grad()
    engine.set_trainable(False)
    tokens = torch.randint(0, 64, (2, 8))
    loss, _ = engine.model(tokens, labels=tokens)
    assert not loss.requires_grad
    assert float(engine.grad_sq_norm()) == 0.0
