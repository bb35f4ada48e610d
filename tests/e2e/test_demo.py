"""README's first command, `hmtrain demo`, end to end through the CLI on a tiny corpus and model.

If this breaks, README's first command breaks: it runs the same code path (synth -> prepare -> per seed:
train, dense baseline, eval -> the tables and files), only smaller.
"""
import json

from tests.e2e.conftest import MICRO, run_cli

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
