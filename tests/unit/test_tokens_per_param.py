"""Tokens per memory parameter against a hand count, the fetched memory's gains against hand-made seeds, and
the study's gain figure and table from them."""
import pytest
from rich.console import Console

from hmtrain.config import flatten, load_config, to_yaml
from hmtrain.eval.figures import gain_vs_tokens_per_param
from hmtrain.eval.summary import perplexity_gains
from hmtrain.eval.tokens_per_param import run_tokens_per_parameter, tokens_per_parameter
from hmtrain.info import print_info
from hmtrain.study.report import dense_crossing, tokens_markdown
from hmtrain.study.spec import check_configs, load_spec
from tests.e2e.test_eval_figures import assert_png

# tiny: 4 layers, d_model 128 (an ffn unit is 3 x 128 = 384 per layer), tree [8, 8], batch 16 x 256 tokens
TINY = ["data.embedder=hashing", "memory.units=[16,8]", "train.memory_steps=128"]


def test_tokens_per_parameter_by_hand():
    counted = tokens_per_parameter(load_config("tiny", TINY))
    tokens = 128 * 16 * 256  # 524,288
    level1, level2 = 8 * 16 * 4 * 384, 64 * 8 * 4 * 384  # 196,608 and 786,432
    assert counted["tokens"] == tokens == 524_288
    assert counted["bank_parameters"] == level1 + level2 == 983_040
    assert counted["tokens_per_parameter"] == pytest.approx(0.5333, abs=1e-4)
    first, second = counted["levels"]
    assert (first["nodes"], first["row_parameters"], first["tokens_per_row"]) == (8, 16 * 4 * 384, tokens / 8)
    assert first["tokens_per_parameter"] == pytest.approx(65_536 / 24_576)  # 2.67: a row sees 1/8 of the tokens
    assert (second["nodes"], second["tokens_per_row"]) == (64, 8192)
    assert second["tokens_per_parameter"] == pytest.approx(8192 / 12_288)  # 0.667


def test_a_level_without_units_is_left_out_and_the_pretraining_batch_does_not_count():
    counted = tokens_per_parameter(load_config("tiny", [*TINY, "memory.units=[0,8]", "memory.layers=late",
                                                        "train.pretrain_global_batch_size=32"]))
    # late on 4 layers: layer 3 only (a bank row holds its memory layers' slots only)
    assert [level["level"] for level in counted["levels"]] == [2]
    assert counted["bank_parameters"] == 64 * 8 * 1 * 384
    assert counted["tokens"] == 128 * 16 * 256


def test_run_tokens_per_parameter_reads_the_run_config(tmp_path):
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("tiny", [*TINY, "train.memory_steps=64"])))
    counted = run_tokens_per_parameter(tmp_path)
    assert counted["memory_steps"] == 64 and counted["tokens"] == 64 * 16 * 256
    assert counted["config"] == str(tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("tiny", [*TINY, "train.mode=dense"])))
    assert run_tokens_per_parameter(tmp_path) is None  # a dense run trained no bank
    with pytest.raises(FileNotFoundError, match="not a trained run directory"):
        run_tokens_per_parameter(tmp_path / "missing")


def test_info_prints_the_count():
    out = Console(record=True, width=400, file=open("/dev/null", "w"))
    summary = print_info(load_config("tiny", TINY), out)
    assert summary["tokens"]["tokens"] == 524_288
    assert ("memory phase: 128 steps x 16 sequences x 256 tokens = 524,288 tokens, 0.533 per bank parameter; "
            "a level-1 row 65,536 tokens for 24,576 parameters (2.67)") in out.export_text()


def seeds(dense: bool = True) -> dict:
    def results(fetched, alone, baseline):
        rows = [("anchor + fetched memory", fetched), ("anchor alone", alone)]
        return {"rows": [{"name": name, "perplexity": value}
                         for name, value in rows + ([("dense baseline", baseline)] if dense else [])]}
    return {0: results(10.0, 15.0, 12.5), 1: results(12.0, 15.0, 10.0)}


def test_gains_per_seed_then_mean_and_sample_std():
    gains = perplexity_gains(seeds())
    # vs anchor: 100 x (1 - 10/15) = 33.3 and 100 x (1 - 12/15) = 20; vs dense: +20 and -20
    assert gains["vs_anchor"]["mean"] == pytest.approx(80 / 3)
    assert gains["vs_anchor"]["std"] == pytest.approx((40 / 3) / 2 ** 0.5)
    assert gains["vs_dense"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert gains["vs_dense"]["std"] == pytest.approx(40 / 2 ** 0.5)
    assert list(perplexity_gains(seeds(dense=False))) == ["vs_anchor"]


def test_gain_figure_and_table(tmp_path):
    arms = {}
    for name, steps in (("steps16", 16), ("steps128", 128)):
        arms[name] = {"tokens": tokens_per_parameter(load_config("tiny", [*TINY, f"train.memory_steps={steps}"])),
                      "gains": perplexity_gains(seeds(dense=name == "steps128"))}
    points = {name: {"tokens_per_parameter": arm["tokens"]["tokens_per_parameter"], "gains": arm["gains"]}
              for name, arm in arms.items()}
    assert_png(gain_vs_tokens_per_param(points, tmp_path / "gain.png"))
    with pytest.raises(ValueError, match="no perplexity gain"):
        gain_vs_tokens_per_param({"a": {"tokens_per_parameter": 1.0, "gains": {}}}, tmp_path / "none.png")
    assert tokens_markdown({"seeds": [0, 1], "arms": {"dense": {"tokens": None, "gains": {}}}}) == ""
    lines = tokens_markdown({"seeds": [0, 1], "arms": {**arms, "dense": {"tokens": None, "gains": {}}}}).splitlines()
    assert lines[2] == ("| arm | memory steps | memory-phase tokens | bank parameters | tokens / parameter | "
                        "level 1 tokens / parameter | level 2 tokens / parameter | gain over the anchor alone (%) | "
                        "gain over the dense baseline (%) |")
    assert lines[4] == "| steps16 | 16 | 65,536 | 983,040 | 0.0667 | 0.333 | 0.0833 | +26.67 ± 9.43 | - |"
    assert lines[5].endswith("| 0.533 | 2.67 | 0.667 | +26.67 ± 9.43 | +0.00 ± 28.28 |")


def test_where_the_dense_baseline_stops_winning():
    def arm(x, gain):
        return {"tokens": {"tokens_per_parameter": x}, "gains": {"vs_dense": {"mean": gain, "std": 1.0}}}
    assert "between 0.2 (arm b) and 0.4 (arm c)" in dense_crossing(
        {"c": arm(0.4, 1.0), "a": arm(0.1, 2.0), "b": arm(0.2, -1.0), "d": arm(0.8, 3.0)})
    assert "lower mean perplexity at the most tokens per parameter measured (0.8, arm d)" in dense_crossing(
        {"a": arm(0.1, 2.0), "d": arm(0.8, -3.0)})
    assert "in every arm, from 0.1" in dense_crossing({"a": arm(0.1, 2.0), "d": arm(0.8, 3.0)})
    assert dense_crossing({"a": {"tokens": {"tokens_per_parameter": 0.1}, "gains": {}}}) == ""


def test_the_shipped_spec_counts_what_its_comment_says():
    spec = load_spec("tokens-per-param-tiny")
    configs = check_configs(spec, [])
    steps = [cfg.train.memory_steps for cfg in configs.values()]
    assert len(set(steps)) >= 4 and all(s & (s - 1) == 0 for s in steps)  # 2^k for four k or more
    assert spec.dense_baseline and spec.seeds == [0, 1, 2]
    assert len({flatten_without_steps(cfg) for cfg in configs.values()}) == 1  # one arm, its steps aside
    comment = "\n".join(line for line in spec.path.read_text().splitlines() if line.startswith("#"))
    for cfg in configs.values():
        counted = tokens_per_parameter(cfg)
        row = (f"{cfg.train.memory_steps} {counted['tokens']:,} {counted['tokens_per_parameter']:.3g} "
               + " ".join(f"{level['tokens_per_parameter']:.3g}" for level in counted["levels"]))
        assert row in " ".join(comment.split()), row


def flatten_without_steps(cfg) -> str:
    return str(sorted((k, str(v)) for k, v in flatten(cfg).items() if k != "train.memory_steps"))
