"""README's first command, `hmtrain demo`, end to end through the CLI on a tiny corpus and model.

If this breaks, README's first command breaks: it runs the same code path (synth -> prepare -> per seed:
train, dense baseline, eval -> the tables and files), only smaller.
"""
import json

from mlflow.tracking import MlflowClient

from tests.e2e.conftest import MICRO, run_cli
from tests.e2e.test_eval_figures import FIGURES, assert_png

ROWS = ["anchor + fetched memory", "anchor + generic memory", "anchor alone", "dense baseline"]
STEPS = ["train.pretrain_steps=2", "train.memory_steps=2", "train.checkpoint_every=2",
         "train.anchor_optim.warmup_steps=0"]


def test_demo_with_two_seeds_writes_its_results(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps at the terminal's width: one line per message here
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", str(out), "--overwrite", "--seeds", "0", "1", "--people", "30",
                   "--documents", "120", *MICRO, *STEPS, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0
    assert f"results: {out / 'results.json'} and {out / 'results.md'}" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["seeds"]) == ["0", "1"]
    for per_seed in results["seeds"].values():
        assert [row["name"] for row in per_seed["rows"]] == ROWS
    assert [row["name"] for row in results["summary"]["rows"]] == ROWS
    markdown = (out / "results.md").read_text()
    assert "Held-out perplexity per level-1 subtree" in markdown
    model_rows = [line for line in markdown.splitlines() if line.startswith("| anchor") or line.startswith("| dense")]
    assert len(model_rows) == len(ROWS) * 3  # the summary table, then each seed's own table
    subtree_rows = markdown.split("Held-out perplexity per level-1 subtree, mean")[1].split("\n\n")[1].splitlines()
    assert [row.split(" | ")[0] for row in subtree_rows[2:]] == ["| 0", "| 1"]  # tree.branching=[2,3]
    assert list(results["seeds"]["0"]["rows"][0]["subtrees"]) == ["0", "1"]

    # it ends by naming its figures, each seed's, beside results.json; each is in its evaluation's MLflow run
    figures = [out / f"seed{seed}_{name}.png" for seed in (0, 1) for name in FIGURES]
    assert "figures: " + ", ".join(map(str, figures)) in proc.stdout
    for path in figures:
        assert_png(path)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    evals = [r for r in runs if r.data.tags.get("hmtrain.kind") == "eval"]
    memory_runs = {json.loads((out / f"seed{seed}" / "memory" / "mlflow_run.json").read_text())["run_id"]
                   for seed in (0, 1)}
    assert {r.data.tags["mlflow.parentRunId"] for r in evals} == memory_runs and len(evals) == 2
    for run in evals:
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        seed = next(s for s in (0, 1) if f"figures/seed{s}_long_tail.png" in logged)
        assert logged == {f"figures/seed{seed}_{name}.png" for name in FIGURES}
