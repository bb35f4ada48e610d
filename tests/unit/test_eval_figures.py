"""hmtrain/eval/figures.py and the MLflow metric names of hmtrain/eval/tracking.py, from hand-made results."""
import pytest

from hmtrain.eval.figures import MAX_BARS, eval_figures, long_tail, tree_balance
from hmtrain.eval.tracking import eval_metrics, metric_key
from tests.e2e.test_eval_figures import assert_png


def results(buckets=("1", "2-3", "16+", "all")) -> dict:
    def row(name, scale):
        return {"name": name, "perplexity": 10.0 * scale,
                "subtrees": {"0": {"perplexity": 9.0 * scale, "tokens": 120}, "1": {"perplexity": 11.0 * scale,
                                                                                   "tokens": 80}},
                "probe_accuracy": {b: min(1.0, 0.2 * scale + 0.1 * i) for i, b in enumerate(buckets)}}
    return {"checkpoint": "/runs/mem/checkpoints/step_00000004", "step": 4,
            "rows": [row("anchor + fetched memory", 1.0), row("anchor alone", 1.5), row("dense baseline", 1.2)],
            "probes": {"count": 30, "per_bucket": {b: 10 for b in buckets if b != "all"}},
            "routing_agreement": {"level1": 0.75, "level2": 0.5}}


def manifest(branching=(2, 3)) -> dict:
    sizes = [2, 6] if tuple(branching) == (2, 3) else [branching[0], branching[0] * branching[1]]
    return {"branching": list(branching), "node_tokens": [[100 * (i + 1) for i in range(n)] for n in sizes],
            "node_documents": [[3 * (i + 1) for i in range(n)] for n in sizes]}


def test_every_figure_is_a_png_named_after_the_prefix(tmp_path):
    written = eval_figures(results(), manifest(), tmp_path, prefix="run_")
    assert [p.name for p in written] == ["run_long_tail.png", "run_subtree_perplexity.png", "run_tree_balance.png"]
    for path in written:
        assert_png(path)


def test_a_level_wider_than_the_bar_limit_is_drawn_sorted(tmp_path):
    wide = manifest(branching=(4, MAX_BARS))  # 256 level-2 nodes
    assert_png(tree_balance(wide, tmp_path / "balance.png"))


def test_figures_without_their_data_are_left_out_or_refused(tmp_path):
    no_probes = results()
    for row in no_probes["rows"]:
        del row["probe_accuracy"]
    written = eval_figures(no_probes, {"branching": [2, 3]}, tmp_path)  # an older manifest: no per-node counts
    assert [p.name for p in written] == ["subtree_perplexity.png"]
    with pytest.raises(ValueError, match="no probe accuracy"):
        long_tail(no_probes, tmp_path / "x.png")
    with pytest.raises(ValueError, match="node_tokens"):
        tree_balance({"branching": [2, 3]}, tmp_path / "y.png")


def test_metric_names_are_the_documented_ones():
    metrics = eval_metrics(results())
    assert metrics["eval/memory/ppl"] == 10.0
    assert metrics["eval/anchor/ppl/subtree_1"] == 16.5
    assert metrics["eval/dense/probe_acc/16plus"] == pytest.approx(0.44)
    assert metrics["eval/routing_agreement/level_1"] == 0.75
    assert len(metrics) == 3 * (1 + 2 + 4) + 2
    assert metric_key("10-99") == "10-99" and metric_key("a b/c") == "a_b_c"


def test_buckets_that_would_share_a_metric_name_are_refused():
    with pytest.raises(ValueError, match="same MLflow metric"):
        eval_metrics(results(buckets=("a b", "a_b", "all")))
