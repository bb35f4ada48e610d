"""The demo's summary over seeds: mean and sample standard deviation per row and column."""
import pytest

from hmtrain.eval.summary import main, subtree_markdown, subtree_summary, summarize, summary_markdown


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


def with_subtrees(fetched, alone):
    return {"rows": [{"name": name, "parameters": 10, "perplexity": sum(ppl) / 2,
                      "subtrees": {str(n): {"perplexity": p, "tokens": 100 * (n + 1)} for n, p in enumerate(ppl)}}
                     for name, ppl in (("anchor + fetched memory", fetched), ("anchor alone", alone))]}


def test_per_subtree_perplexity_and_the_memorys_change_per_seed():
    per_seed = {0: with_subtrees([9.0, 20.0], [10.0, 20.0]), 1: with_subtrees([8.0, 22.0], [10.0, 20.0])}
    nodes = subtree_summary(per_seed)["nodes"]
    assert [n["node"] for n in nodes] == [0, 1] and [n["tokens"] for n in nodes] == [100, 200]
    assert nodes[0]["perplexity"]["anchor + fetched memory"]["mean"] == pytest.approx(8.5)
    assert nodes[0]["fetched_vs_alone_pct"]["mean"] == pytest.approx(-15.0)  # -10% and -20%
    assert nodes[1]["fetched_vs_alone_pct"]["mean"] == pytest.approx(5.0)  # 0% and +10%
    table = subtree_markdown(subtree_summary(per_seed))
    assert "| 0 | 100 | 8.50 ± 0.71 | 10.00 ± 0.00 | -15.0% ± 7.1 |" in table


def test_the_summary_command_reads_eval_files(tmp_path, capsys):
    import json

    files = []
    for seed, (fetched, alone) in enumerate((([9.0, 20.0], [10.0, 20.0]), ([8.0, 22.0], [10.0, 20.0]))):
        files.append(tmp_path / f"eval-s{seed}.json")
        files[-1].write_text(json.dumps(with_subtrees(fetched, alone)))
    assert main([*map(str, files), "--out", str(tmp_path / "summary.md")]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "| anchor + fetched memory | 14.75 ± 0.35 |" in text and "-15.0% ± 7.1" in text


def test_the_summary_command_refuses_files_of_different_probe_routings(tmp_path, capsys):
    import json

    files = []
    for seed, routing in enumerate(("oracle", None)):  # None: a file from before eval.probe_routing (question)
        files.append(tmp_path / f"eval-s{seed}.json")
        files[-1].write_text(json.dumps({**results(2.0, 0.5), **({"probe_routing": routing} if routing else {})}))
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, files)))
    assert exit_info.value.code == 2 and "oracle, question" in capsys.readouterr().err
