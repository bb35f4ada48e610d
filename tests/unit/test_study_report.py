"""A study's tables and figures from hand-made per-seed results: one row per arm and model row, mean ± sample
std over the seeds; without probes the long-tail figure is refused and the overview draws perplexity alone."""
import pytest

from hmtrain.eval.figures import arms_long_tail, arms_overview
from hmtrain.eval.summary import arms_markdown, summarize
from tests.e2e.test_eval_figures import assert_png
from tests.unit.test_eval_figures import results


def per_seed(scale: float, probes: bool = True) -> dict:
    seeds = {}
    for seed, factor in ((0, 1.0), (1, 1.2)):
        made = results()
        for row in made["rows"]:
            row["perplexity"] *= scale * factor
            row["parameters"] = 1000
            if not probes:
                del row["probe_accuracy"]
        seeds[seed] = made
    return seeds


def test_arms_table_holds_every_arm_and_row_with_mean_and_std():
    summaries = {"ffn": summarize(per_seed(1.0)), "lora_ffn": summarize(per_seed(2.0))}
    lines = arms_markdown(summaries).splitlines()
    assert lines[2] == "| arm | model | perplexity | acc 1 | acc 2-3 | acc 16+ | acc all |"
    rows = [line for line in lines if line.startswith("| ffn |") or line.startswith("| lora_ffn |")]
    assert len(rows) == 6
    # lora_ffn's fetched row: perplexities 20 and 24 over the two seeds
    assert rows[3].startswith("| lora_ffn | anchor + fetched memory | 22.00 ± 2.83 |")


def test_arms_figures(tmp_path):
    summaries = {"ffn": summarize(per_seed(1.0)), "lora_ffn": summarize(per_seed(2.0))}
    assert_png(arms_overview(summaries, tmp_path / "overview.png"))
    assert_png(arms_long_tail(summaries, tmp_path / "long_tail.png"))
    bare = {"ffn": summarize(per_seed(1.0, probes=False))}
    assert_png(arms_overview(bare, tmp_path / "bare.png"))
    with pytest.raises(ValueError, match="no probe accuracy"):
        arms_long_tail(bare, tmp_path / "none.png")
