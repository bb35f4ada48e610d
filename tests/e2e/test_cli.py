"""The real CLI end to end: synth -> prepare -> train (memory model and dense baseline) -> eval."""
import json
import math

import torch

from mlflow.tracking import MlflowClient

from tests.e2e.conftest import run_cli


def test_pipeline_trains_and_evaluates(prepared, tmp_path):
    root, overrides = prepared["root"], prepared["overrides"]
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    assert manifest["branching"] == [2, 3] and manifest["splits"]["train"] and manifest["splits"]["heldout"]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = ["train.pretrain_steps=3", "train.memory_steps=3", "train.checkpoint_every=3",
             f"logging.tracking_uri={tracking}"]
    run_cli("train", "--config", "tiny", *overrides, *steps, f"train.run_dir={tmp_path / 'memory'}", cwd=tmp_path)
    run_cli("train", "--config", "tiny", *overrides, *steps, f"train.run_dir={tmp_path / 'dense'}",
            "train.mode=dense", cwd=tmp_path)
    out = tmp_path / "results.json"
    proc = run_cli("eval", "--config", "tiny", *overrides, "--checkpoint", str(tmp_path / "memory"),
                   "--baseline", str(tmp_path / "dense"), "--out", str(out), cwd=tmp_path)
    assert "anchor+memory" in proc.stdout and "dense" in proc.stdout

    results = json.loads(out.read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["anchor + fetched memory", "anchor + generic memory", "anchor alone", "dense baseline"]
    for row in results["rows"]:
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert 0.0 <= row["probe_accuracy"]["all"] <= 1.0
    fetched, _generic, alone, dense = results["rows"]
    assert dense["parameters"] > alone["parameters"] and fetched["parameters"] > alone["parameters"]
    assert set(results["routing_agreement"]) == {"level1", "level2"}
    assert results["probes"]["count"] == 40

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    memory_run = next(r for r in runs if r.data.params["train.mode"] == "hierarchical")
    losses = client.get_metric_history(memory_run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert "memory/level1/rows_updated" in memory_run.data.metrics and "memory/generic_sequences" in memory_run.data.metrics
    assert memory_run.data.params["train.global_batch_size"] == "4"


def test_info_prints_the_paper_budget(tmp_path):
    proc = run_cli("info", "--config", "paper-160m", cwd=tmp_path)
    flat = proc.stdout.replace(",", "")
    assert "163510016" in flat and "18063360" in flat and "4624220160" in flat


def test_bad_input_is_named(prepared, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "body": "no text field"}\n')
    proc = run_cli("data", "prepare", "--config", "tiny", *prepared["overrides"], f"data.documents={bad}",
                   f"data.prepared={tmp_path / 'p'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "bad.jsonl" in proc.stderr and "text" in proc.stderr
    assert not (tmp_path / "p").exists()

    proc = run_cli("train", "--config", "tiny", *prepared["overrides"], "train.batch_sise=2", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2 and "train.batch_sise" in proc.stderr


def test_frozen_anchor_stays_fixed_while_the_memory_trains(prepared, tmp_path):
    from hmtrain.eval.loading import load_trained

    run = tmp_path / "frozen"
    run_cli("train", "--config", "tiny", *prepared["overrides"], "train.anchor=frozen", "train.pretrain_steps=2",
            "train.memory_steps=2", "train.checkpoint_every=2", "logging.mlflow=false", f"train.run_dir={run}",
            cwd=tmp_path)
    after_pretrain = load_trained(run / "checkpoints" / "step_00000002")
    after_memory = load_trained(run / "checkpoints" / "step_00000004")
    for (name, a), (_, b) in zip(after_pretrain.model.state_dict().items(), after_memory.model.state_dict().items()):
        assert torch.equal(a, b), f"anchor parameter {name} changed while frozen"
    changed = [name for name, table in after_memory.bank.tables.items()
               if not torch.equal(table, after_pretrain.bank.tables[name])]
    assert changed, "the memory did not train"
