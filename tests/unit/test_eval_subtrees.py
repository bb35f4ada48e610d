"""Held-out perplexity per level-1 subtree: each subtree's own tokens, and the tables that show it."""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from hmtrain.eval.evaluate import subtree_table, to_markdown
from hmtrain.eval.scoring import heldout_perplexity


class FixedLogits(torch.nn.Module):
    """Logits that depend on the token and the position only: a model whose losses are known."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, tokens, *, segments=None, memory=None):
        return self.table[tokens] + 0.1 * torch.arange(tokens.shape[1])[None, :, None]


def _batches():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (5, 6), generator=g)
    labels = torch.randint(0, 11, (5, 6), generator=g)
    labels[1, 4:] = -100  # padding
    labels[3, :2] = -100
    paths = torch.tensor([[0, 1], [2, 5], [0, 0], [2, 4], [1, 3]])
    batch = {"tokens": tokens, "labels": labels, "segments": torch.zeros_like(tokens), "paths": paths}
    return [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}], batch


def test_each_subtree_scores_only_its_own_sequences():
    model = FixedLogits()
    batches, whole = _batches()
    out = heldout_perplexity(model, None, batches, "none", torch.device("cpu"))
    logits = model(whole["tokens"])
    assert list(out["subtrees"]) == ["0", "1", "2"]  # the keys JSON gives back, so memory and disk agree
    assert json.loads(json.dumps(out)) == out
    for node in (0, 1, 2):
        rows = whole["paths"][:, 0] == node
        nll = F.cross_entropy(logits[rows].flatten(0, 1), whole["labels"][rows].flatten(), ignore_index=-100)
        got = out["subtrees"][str(node)]
        assert got["tokens"] == int((whole["labels"][rows] != -100).sum())
        assert math.isclose(got["perplexity"], math.exp(float(nll)), rel_tol=1e-5)
    assert out["tokens"] == sum(s["tokens"] for s in out["subtrees"].values())
    total = sum(s["nll"] * s["tokens"] for s in out["subtrees"].values()) / out["tokens"]
    assert math.isclose(out["nll"], total, rel_tol=1e-6)


def test_tables_have_a_row_per_subtree_and_a_column_per_model():
    rows = [{"name": "anchor + fetched memory", "parameters": 10, "perplexity": 3.0,
             "subtrees": {"0": {"perplexity": 2.5, "tokens": 40}, "1": {"perplexity": 3.5, "tokens": 60}}},
            {"name": "anchor alone", "parameters": 8, "perplexity": 4.0,
             "subtrees": {"0": {"perplexity": 3.25, "tokens": 40}, "1": {"perplexity": 4.5, "tokens": 60}}}]
    table = subtree_table({"rows": rows})
    assert table == [["subtree", "tokens", "anchor+memory", "anchor"], ["0", "40", "2.50", "3.25"],
                     ["1", "60", "3.50", "4.50"]]
    markdown = to_markdown({"rows": rows})
    assert "| 0 | 40 | 2.50 | 3.25 |" in markdown and "| 1 | 60 | 3.50 | 4.50 |" in markdown
    assert subtree_table({"rows": [{"name": "x", "perplexity": 1.0, "parameters": 1}]}) == []


def test_subtree_keys_sort_by_node_number_past_nine():
    paths = torch.tensor([[10, 0], [2, 0], [9, 0]])
    batch = {"tokens": torch.zeros(3, 4, dtype=torch.long), "labels": torch.ones(3, 4, dtype=torch.long),
             "segments": torch.zeros(3, 4, dtype=torch.long), "paths": paths}
    out = heldout_perplexity(FixedLogits(), None, [batch], "none", torch.device("cpu"))
    assert list(out["subtrees"]) == ["2", "9", "10"]
