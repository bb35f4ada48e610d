"""The demo's summary over seeds: mean and sample standard deviation per row and column."""
import pytest

from hmtrain.demo import summarize, summary_markdown


def results(ppl, acc):
    return {"rows": [{"name": "anchor + fetched memory", "parameters": 10, "perplexity": ppl,
                      "probe_accuracy": {"1": acc, "all": acc / 2}}]}


def test_mean_and_sample_std_over_seeds():
    summary = summarize({0: results(2.0, 0.40), 1: results(3.0, 0.20), 2: results(4.0, 0.30)})
    stats = summary["rows"][0]["stats"]
    assert stats["perplexity"] == {"mean": 3.0, "std": 1.0, "min": 2.0, "max": 4.0}
    assert stats["acc 1"]["mean"] == pytest.approx(30.0) and stats["acc 1"]["std"] == pytest.approx(10.0)
    assert stats["acc all"]["mean"] == pytest.approx(15.0)
    table = summary_markdown(summary)
    assert "| anchor + fetched memory | 3.00 ± 1.00 | 30.0 ± 10.0 | 15.0 ± 5.0 |" in table
    assert summarize({7: results(2.0, 0.5)})["rows"][0]["stats"]["perplexity"]["std"] == 0.0
