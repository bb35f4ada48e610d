"""`hmtrain study` end to end: a 2-arm x 2-seed spec on a tiny corpus and model, killed in its first arm,
resumed, then rerun with everything finished; and a bad spec stopping before any work, naming its key."""
import json

import pytest
from mlflow.tracking import MlflowClient

from hmtrain.cli import main
from tests.e2e.conftest import MICRO, run_cli
from tests.e2e.test_eval_figures import assert_png

ARMS = ("ffn", "lora_ffn")
STEPS = ["train.pretrain_steps=2", "train.memory_steps=2", "train.checkpoint_every=2",
         "train.anchor_optim.warmup_steps=0", "logging.system_metrics=false"]


def write_spec(path, arms: str, seeds: str = "[0, 1]", extra: str = "", base: tuple = ()) -> None:
    path.write_text(f"""name: kinds
base:
  config: tiny
  overrides: {json.dumps([*MICRO, *STEPS, *base])}
synth: {{people: 30, documents: 120}}
arms:
{arms}
seeds: {seeds}
{extra}""")


TWO_ARMS = "\n".join(f"  - {{name: {kind}, overrides: [memory.kind={kind}]}}" for kind in ARMS)


def checkpoints(out):
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/seed*/memory/checkpoints/step_*"))}


def test_study_runs_resumes_and_skips_finished_runs(tmp_path, capsys, monkeypatch):
    spec, out = tmp_path / "kinds.yaml", tmp_path / "study"
    write_spec(spec, TWO_ARMS, extra="eval: {dense_baseline: true}\n")
    # killed at the first run's phase switch (step 2, just checkpointed): the study stops there
    killed = run_cli("study", "--spec", str(spec), "--out", str(out), cwd=tmp_path, check=False,
                     env={"HMTRAIN_FAULT": "phase_switch@2"})
    assert killed.returncode != 0
    assert not (out / "runs" / "ffn" / "seed0" / "done.json").exists()
    assert (out / "runs" / "ffn" / "seed0" / "memory" / "checkpoints" / "step_00000002").is_dir()

    proc = run_cli("study", "--spec", str(spec), "--out", str(out), cwd=tmp_path,
                   env={"HMTRAIN_LOG_LEVEL": "INFO", "COLUMNS": "300"})
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr  # the killed run continued
    for k, (arm, seed) in enumerate([(a, s) for a in ARMS for s in (0, 1)], start=1):
        assert f"arm {arm}, seed {seed} ({k} of 4)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == list(ARMS)
    for arm in ARMS:
        table = summary["arms"][arm]["summary"]
        assert table["seeds"] == [0, 1]
        fetched = next(row for row in table["rows"] if row["name"] == "anchor + fetched memory")
        assert set(fetched["stats"]) >= {"perplexity", "acc all"}
        per_seed = [json.loads((out / "runs" / arm / f"seed{s}" / "eval.json").read_text()) for s in (0, 1)]
        values = [next(r["perplexity"] for r in results["rows"] if r["name"] == fetched["name"])
                  for results in per_seed]
        assert fetched["stats"]["perplexity"]["mean"] == pytest.approx(sum(values) / 2)
        assert fetched["stats"]["perplexity"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert summary["arms"][arm]["subtrees"]["nodes"]  # per level-1 subtree
        assert table["rows"][-1]["name"] == "dense baseline"
    # the arms differ in memory keys only: one dense baseline per seed serves both
    assert sorted(p.name for p in out.glob("dense/*/seed*")) == ["seed0", "seed1"]
    markdown = (out / "summary.md").read_text()
    assert sum(line.startswith(f"| {arm} | anchor + fetched memory |") for arm in ARMS for line in
               markdown.splitlines()) == 2
    for name in ("arms_overview.png", "arms_long_tail.png", "gain_vs_tokens_per_param.png"):
        assert_png(out / name)
    # tokens per memory parameter, from each arm's run config: 2 memory steps x 4 sequences x 64 tokens over
    # a bank of tree [2, 3] x units [8, 4] x 2 layers x 3*32 (ffn) or 3*(32 + 64) (lora_ffn) per unit and layer
    for arm, per_unit in (("ffn", 96), ("lora_ffn", 288)):
        tokens = summary["arms"][arm]["tokens"]
        assert tokens["config"] == str(out / "runs" / arm / "seed0" / "memory" / "config.yaml")
        assert tokens["tokens"] == 512 and tokens["bank_parameters"] == (2 * 8 + 6 * 4) * 2 * per_unit
        assert [level["tokens_per_parameter"] for level in tokens["levels"]] == pytest.approx(
            [512 / (2 * 8 * 2 * per_unit), 512 / (6 * 4 * 2 * per_unit)])
        assert set(summary["arms"][arm]["gains"]) == {"vs_anchor", "vs_dense"}
        rows = [{r["name"]: r["perplexity"] for r in json.loads((out / "runs" / arm / f"seed{s}" / "eval.json")
                                                                   .read_text())["rows"]} for s in (0, 1)]
        gains = [100 * (1 - r["anchor + fetched memory"] / r["dense baseline"]) for r in rows]
        assert summary["arms"][arm]["gains"]["vs_dense"]["mean"] == pytest.approx(sum(gains) / 2)
    head = next(line for line in markdown.splitlines() if line.startswith("| arm | memory steps |"))
    assert head.endswith("| tokens / parameter | level 1 tokens / parameter | level 2 tokens / parameter | "
                         "gain over the anchor alone (%) | gain over the dense baseline (%) |")
    assert "| ffn | 2 | 512 | 7,680 | 0.0667 | 0.167 | 0.111 | " in markdown

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    parent = [r for r in runs if r.data.tags.get("hmtrain.kind") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    # each dense baseline sits under the memory run of the first arm x seed it served
    assert len([r for r in runs if r.info.run_name.startswith("dense seed")]) == 2
    assert children == {f"{arm} seed{seed}" for arm in ARMS for seed in (0, 1)}
    assert "study/ffn/memory/ppl" in parent[0].data.metrics
    assert parent[0].data.metrics["study/lora_ffn/tokens_per_param"] == pytest.approx(512 / 23_040)
    assert "study/ffn/gain_vs_dense_pct" in parent[0].data.metrics

    # everything finished: a rerun (in this process: no start-up to wait for) trains nothing, writes the same summary
    before = checkpoints(out)
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("HMTRAIN_LOG_LEVEL", "WARNING")
    capsys.readouterr()
    assert main(["study", "--spec", str(spec), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skipped: ") == 4
    assert checkpoints(out) == before and len(before) == 8
    assert json.loads((out / "summary.json").read_text()) == summary
    rerun = client.get_run(parent[0].info.run_id)
    assert rerun.info.status == "FINISHED"
    assert len(client.get_metric_history(rerun.info.run_id, "study/ffn/memory/ppl")) == 1  # not logged again


@pytest.mark.parametrize("arms, seeds, extra, key", [
    (TWO_ARMS, "[0, 1]", "repeats: 3\n", "'repeats': unknown"),
    ("  - {name: ffn, overrides: [memory.kind=ffn]}\n  - {name: bare}", "[0, 1]", "", "'arms[1].overrides'"),
    ("  - {name: ffn, overrides: [memory.kind=ffn]}\n  - {name: empty, overrides: []}", "[0]", "",
     "'arms[1].overrides'"),
    (TWO_ARMS, "[0, -1]", "", "'seeds': -1"),
    (TWO_ARMS, "two", "", "'seeds'"),
    (TWO_ARMS, "[0, 0]", "", "'seeds'"),
    ("  - {name: ffn, overrides: [memory.kindd=ffn]}", "[0]", "", "'arms[0].overrides' (arm ffn): override "
     "'memory.kindd=ffn': unknown key"),
    ("  - {name: ffn, overrides: [train.seed=3]}", "[0]", "", "'arms[0].overrides': train.seed is set by the study"),
    (TWO_ARMS, "[0]", "", "'base.overrides' (or the command line's overrides): override 'model.d_modell=3'"),
    ("  - {name: ffn, overrides: [data.documents=x.jsonl]}", "[0]", "", "'arms[0].overrides': data.documents is the "
     "study's own corpus"),
    ("  - {name: ffn, overrides: [logging.mlflow=false]}", "[0]", "", "'arms[0].overrides': logging.mlflow is one "
     "for the whole study"),
])
def test_spec_errors_exit_2_naming_the_key(tmp_path, capsys, arms, seeds, extra, key):
    spec, out = tmp_path / "bad.yaml", tmp_path / "study"
    base = ("model.d_modell=3",) if key.startswith("'base.overrides'") else ()
    write_spec(spec, arms, seeds, extra, base)
    assert main(["study", "--spec", str(spec), "--out", str(out)]) == 2  # in this process: no start-up to wait for
    stderr = capsys.readouterr().err
    assert stderr.startswith("hmtrain study: error: spec key ") and key in stderr, stderr
    assert not out.exists()  # found before any work
