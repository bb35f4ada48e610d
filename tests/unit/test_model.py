"""The anchor transformer and its memory-augmented FFN."""
import dataclasses

import torch
import torch.nn.functional as F

from hmtrain.config import ModelConfig, load_config
from hmtrain.memory import build_bank
from hmtrain.model import Transformer, count_parameters, dense_config
from hmtrain.model.transformer import FeedForward

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=48, rope_base=1e4)


def numel(model):
    return sum(p.numel() for p in model.parameters())


def test_count_matches_module_for_variants():
    for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=False), dataclasses.replace(TINY, qk_norm=False)):
        assert count_parameters(cfg) == numel(Transformer(cfg, max_seq_len=16))


def test_paper_160m_anchor_is_exact():
    cfg = load_config("paper-160m").model
    assert count_parameters(cfg) == 163_510_016
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len=2048)
    assert numel(model) == 163_510_016


def test_dense_baseline_is_about_the_target():
    target = 2 * count_parameters(TINY)
    dense = dense_config(TINY, target)
    assert abs(count_parameters(dense) - target) / target < 0.05
    assert dense.n_layers == TINY.n_layers and dense.d_model > TINY.d_model


def test_memory_ffn_is_anchor_plus_per_sequence_memory():
    torch.manual_seed(0)
    ffn = FeedForward(TINY)
    B, T, M = 3, 5, 7
    x = torch.randn(B, T, TINY.d_model)
    u_gate, u_up = torch.randn(B, M, TINY.d_model), torch.randn(B, M, TINY.d_model)
    u_down = torch.randn(B, TINY.d_model, M)
    got = ffn(x, (u_gate, u_up, u_down), "torch")
    anchor = ffn(x, None, "torch")
    for b in range(B):
        memory = (F.silu(x[b] @ u_gate[b].T) * (x[b] @ u_up[b].T)) @ u_down[b].T
        torch.testing.assert_close(got[b], anchor[b] + memory, rtol=1e-5, atol=1e-5)


def _bank_cfg():
    cfg = load_config("tiny", ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.head_dim=8",
                               "model.ffn_hidden=48", "model.vocab_size=97", "tree.branching=[2,3]",
                               "memory.units=[4,2]"])
    return cfg


def test_fresh_memory_changes_nothing_and_trained_memory_does():
    cfg = _bank_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg.model, max_seq_len=16)
    bank = build_bank(cfg)
    tokens = torch.randint(0, 97, (2, 9))
    paths = torch.tensor([[0, 1], [1, 5]])
    plain = model(tokens)
    with_memory = model(tokens, memory=bank.fetch(paths, requires_grad=False))
    torch.testing.assert_close(with_memory, plain)
    for table in bank.tables.values():
        table[:, :, 2].normal_()  # give the down rows weight, as training would
    changed = model(tokens, memory=bank.fetch(paths, requires_grad=False))
    assert not torch.allclose(changed, plain)


def test_attention_and_positions_stay_inside_documents():
    torch.manual_seed(0)
    model = Transformer(TINY, max_seq_len=32)
    first, second = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([first, second], dim=1)
    segments = torch.tensor([[0] * 6 + [1] * 5])
    logits = model(packed, segments=segments)
    torch.testing.assert_close(logits[:, :6], model(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 6:], model(second), rtol=1e-5, atol=1e-5)


def test_gradients_reach_anchor_and_fetched_rows_only():
    cfg = _bank_cfg()
    model = Transformer(cfg.model, max_seq_len=16)
    bank = build_bank(cfg)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    fetched = bank.fetch(torch.tensor([[0, 1]]))
    logits = model(torch.randint(0, 97, (1, 8)), memory=fetched)
    logits.sum().backward()
    bank.accumulate_grads(fetched)
    bank.step(1e-2)
    assert model.layers[0].ffn.w_down.weight.grad is not None
    level1 = bank.tables["level1"]
    untouched = [n for n in range(level1.shape[0]) if n != 1]
    assert torch.equal(level1[untouched], before["level1.weight"][untouched])
    assert not torch.equal(level1[1], before["level1.weight"][1])
