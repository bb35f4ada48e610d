"""The retention probe's parts: windows, encoder specs, the anchor encoder's padding, the probe's
training and metrics, and the deep-routing partition scores."""
import math

import numpy as np
import pytest
import torch

from hmtrain.config import ModelConfig, load_config
from hmtrain.eval.deep_routing import _probe_hits, adjusted_rand_index, fit_deep_levels, purity, route_deep
from hmtrain.model import Transformer
from hmtrain.retention.encoders import _anchor_encoder, anchor_options, parse_spec
from hmtrain.retention.probe import metrics, score_probe, train_probe
from hmtrain.retention.windows import left_pad_windows

PAD = 0


def test_windows_are_cut_in_order_and_left_padded_and_empty_ones_dropped():
    tokens = np.array([[5, 6, 7, 8, 9, PAD, PAD, PAD, PAD, PAD, PAD, PAD, 1]])
    windows = left_pad_windows(tokens, 4, PAD)  # 13 tokens: three windows, the tail dropped
    assert windows.tolist() == [[5, 6, 7, 8], [PAD, PAD, PAD, 9]]  # the all-padding window is gone
    with pytest.raises(ValueError, match="longer"):
        left_pad_windows(tokens, 20, PAD)


def test_specs_labels_and_anchor_options():
    assert parse_spec("router") == ("router", "router")
    assert parse_spec("memory:runs/ae/checkpoints/step_00000400") == ("memory-ae", "memory:runs/ae/checkpoints/"
                                                                      "step_00000400")
    assert parse_spec("my ae=memory:runs/x") == ("my_ae", "memory:runs/x")
    assert parse_spec("anchor:runs/a@layer=0") == ("anchor-a_layer_0", "anchor:runs/a@layer=0")
    assert parse_spec("a0=anchor:runs/a@layer=0") == ("a0", "anchor:runs/a@layer=0")
    for bad in ("bert", "anchor", "untrained:gpt", "memory:"):
        with pytest.raises(ValueError, match="--encoder"):
            parse_spec(bad)
    assert anchor_options("anchor:runs/a@layer=1,position=mean", -1, "last") == ("anchor:runs/a", 1, "mean")
    assert anchor_options("anchor:runs/a", -1, "last") == ("anchor:runs/a", -1, "last")
    with pytest.raises(ValueError, match="unknown option"):
        anchor_options("anchor:runs/a@depth=2", -1, "last")


def test_the_anchor_reads_only_the_real_tokens_of_a_left_padded_window():
    cfg = ModelConfig(vocab_size=30, d_model=16, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=32, rope_base=1e4)
    torch.manual_seed(0)
    model = Transformer(cfg, max_seq_len=8).eval()
    real = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[PAD, PAD, 3, 4, 5]])
    for layer, position in ((-1, "last"), (0, "last"), (-1, "mean")):
        encode = _anchor_encoder(model, layer, position, PAD, "cpu")
        assert torch.allclose(encode(padded), encode(real), atol=1e-5), (layer, position)
    assert not torch.allclose(_anchor_encoder(model, 0, "last", PAD, "cpu")(real),
                              _anchor_encoder(model, -1, "last", PAD, "cpu")(real))
    with pytest.raises(ValueError, match="anchor_layer 2"):
        _anchor_encoder(model, 2, "last", PAD, "cpu")


def test_entropy_ratio_is_one_minus_ce_over_ln_v():
    scores = metrics({"loss_sum": 30.0, "count": 10, "correct": 4}, vocab_size=100)
    assert scores["ce"] == 3.0 and scores["token_accuracy"] == 0.4
    assert scores["entropy_ratio"] == pytest.approx(1 - 3.0 / math.log(100))


def test_the_probe_reads_an_informative_vector_and_not_noise():
    cfg = load_config("tiny", ["retention.n_ctx=4", "retention.steps=150", "retention.batch_size=32",
                               "retention.expansion=repeat",
                               "retention.decoder={d_model: 32, n_layers: 1, n_heads: 2, head_dim: 16, ffn_hidden: 64}",
                               "retention.optim={lr: 1e-2, min_lr: 1e-3, warmup_steps: 5}"])
    g = torch.Generator().manual_seed(0)
    vocab = 12
    windows = torch.randint(1, vocab, (600, 4), generator=g)
    one_hot = torch.nn.functional.one_hot(windows, vocab).float().flatten(1)  # the window, losslessly: 48 dims
    noise = torch.randn(600, 48, generator=g)
    results = {}
    for name, vectors in (("one-hot", one_hot), ("noise", noise)):
        decoder = train_probe(cfg, vectors[:500], windows[:500], expansion="repeat", vocab_size=vocab, pad_id=PAD,
                              device=torch.device("cpu"))
        results[name] = metrics(score_probe(decoder, vectors[500:], windows[500:], PAD, torch.device("cpu")), vocab)
    assert results["one-hot"]["token_accuracy"] > 0.7  # measured 0.785 (seed 0)
    assert results["noise"]["token_accuracy"] < 0.25  # chance over 11 tokens is 9%
    assert results["one-hot"]["entropy_ratio"] > results["noise"]["entropy_ratio"] + 0.5


def test_adjusted_rand_index_and_purity():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a) == pytest.approx(1.0)
    assert adjusted_rand_index(a, np.array([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)  # names do not matter
    # by hand: no pair is together in both; 3 pairs together in each, of 15: expected 3 * 3 / 15 = 0.6, max 3
    b = np.array([0, 1, 1, 2, 2, 0])
    assert adjusted_rand_index(a, b) == pytest.approx((0 - 0.6) / (3 - 0.6))
    assert purity(np.array([0, 0, 0, 1]), np.array([7, 7, 8, 9])) == pytest.approx(3 / 4)


def test_deep_levels_refit_under_each_shallow_node_recover_its_clusters():
    """Two shallow nodes, three well separated clusters under each: the refitted deep level finds them
    (ARI 1 against the truth), numbers children parent * k + i, and routes new points the same way."""

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1) * 10
    truth = torch.arange(6).repeat_interleave(20)
    vectors = centres[truth] + 0.05 * torch.randn(120, 16, generator=g)
    shallow = (truth // 3)[:, None]  # clusters 0-2 under node 0, 3-5 under node 1
    fit_mask = torch.arange(120) % 4 != 0  # a quarter held out of the fit
    cfg = load_config("tiny", ["tree.branching=[2,3]", "tree.em_steps=10"])
    levels = fit_deep_levels(vectors, shallow, fit_mask, [2, 3], 1, cfg)
    assert sorted(levels[0]) == [0, 1] and all(c.shape == (3, 16) for c in levels[0].values())
    deep = route_deep(vectors, shallow[:, 0], levels, [2, 3], 1)[:, 0]
    assert torch.equal(deep // 3, shallow[:, 0])  # children stay under their parent
    assert adjusted_rand_index(deep.numpy(), truth.numpy()) == pytest.approx(1.0)
    # a shallow node no training document reached routes to its first child
    assert route_deep(vectors[:2], torch.tensor([5, 5]), levels, [2, 3], 1)[:, 0].tolist() == [15, 15]


def test_probe_routing_hits_count_the_majority_node_of_the_persons_documents():
    paths = {"a": [0, 1], "b": [0, 1], "c": [0, 2], "d": [1, 4]}
    probes = [{"doc_ids": ["a", "b", "c"]}, {"doc_ids": ["d"]}, {"doc_ids": ["unknown"]}]
    routed = torch.tensor([[0, 1], [1, 5], [0, 0]])  # hit at level 1 for the first only
    assert _probe_hits(paths, probes, routed, level=1) == pytest.approx(1 / 2)  # the third is not counted
    assert _probe_hits(paths, probes, routed, level=0) == pytest.approx(2 / 2)
