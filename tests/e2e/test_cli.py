"""The real CLI end to end: synth -> prepare -> train (memory model and dense baseline) -> eval."""
import json
import math

import torch
from mlflow.tracking import MlflowClient

from hmtrain.model import Transformer
from tests.e2e.conftest import run_cli


def test_pipeline_trains_and_evaluates(prepared, tmp_path):
    root, overrides = prepared["root"], prepared["overrides"]
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    assert manifest["branching"] == [2, 3] and manifest["splits"]["train"] and manifest["splits"]["heldout"]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = ["train.pretrain_steps=3", "train.memory_steps=3", "train.checkpoint_every=3", "train.anchor=cotrain",
             "train.anchor_optim.warmup_steps=0", "train.seed=5", f"logging.tracking_uri={tracking}",
             "logging.system_metrics_interval_s=0.2"]
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
    fetched, generic, alone, dense = results["rows"]
    # the table's accounting: active parameters are the anchor plus what one sequence fetches (2 layers x 3 x d 32
    # x (8 + 4) units), and the dense baseline is sized to twice the anchor
    assert fetched["parameters"] == generic["parameters"] == alone["parameters"] + 2 * 3 * 32 * 12
    assert abs(dense["parameters"] - 2 * alone["parameters"]) / (2 * alone["parameters"]) < 0.05
    # perplexity and accuracy are what the rows say they are: nll and probe counts agree with them
    for row in results["rows"]:
        assert math.isclose(row["perplexity"], math.exp(row["nll"]), rel_tol=1e-9)
        assert round(row["probe_accuracy"]["all"] * 40) == row["probe_accuracy"]["all"] * 40
    assert fetched["perplexity"] != alone["perplexity"]  # the memory takes part in the scores
    assert set(results["routing_agreement"]) == {"level1", "level2"}
    assert results["probes"]["count"] == 40

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    (evaluation,) = [r for r in runs if r.data.tags.get("hmtrain.kind") == "eval"]  # a child of the memory run
    runs = [r for r in runs if r is not evaluation]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    memory_run = next(r for r in runs if r.data.params["train.mode"] == "hierarchical")
    losses = client.get_metric_history(memory_run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert "memory/level2/rows_updated" in memory_run.data.metrics
    assert "memory/generic_sequences" in memory_run.data.metrics
    assert memory_run.data.params["train.global_batch_size"] == "4"
    assert evaluation.data.tags["mlflow.parentRunId"] == memory_run.info.run_id
    assert evaluation.data.metrics["eval/dense/ppl"] == dense["perplexity"]
    assert any(key.startswith("system/cpu_utilization") for key in memory_run.data.metrics)  # node's first rank

    # it learns: the loss falls by a stated margin over six steps, and the anchor moves in both phases
    curve = [json.loads(line)["loss"] for line in (tmp_path / "memory" / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1] < 0.9 * curve[0], curve
    from hmtrain.eval.loading import load_trained

    end_of_pretraining = load_trained(tmp_path / "memory" / "checkpoints" / "step_00000003")
    end = load_trained(tmp_path / "memory" / "checkpoints" / "step_00000006")
    torch.manual_seed(5)  # train.seed: the trainer builds its initial anchor right after seeding with it
    initial = Transformer(end.model.cfg, max_seq_len=end.cfg.data.seq_len).state_dict()
    for name, tensor in end_of_pretraining.model.state_dict().items():
        if name.endswith("wq.weight"):
            assert not torch.equal(tensor, initial[name]), f"{name} did not move in pretraining"
            # ...by training steps (AdamW moves an element by about lr = 3e-3 a step), from this very init
            assert float((tensor - initial[name]).abs().max()) < 2 * 3 * 3e-3
            assert not torch.equal(end.model.state_dict()[name], tensor), f"{name} did not move while co-training"


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


def test_runs_side_by_side_share_one_default_mlflow_store(prepared, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    for name in ("mem", "dense"):
        run_cli("train", "--config", "tiny", *prepared["overrides"], "train.pretrain_steps=1", "train.memory_steps=1",
                "logging.system_metrics=false", f"train.run_dir={runs / name}", cwd=tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    assert sorted(r.info.run_name for r in found) == ["dense", "mem"]  # one `mlflow ui` shows both
    assert not (runs / "mem" / "mlflow.db").exists() and (runs / "mlartifacts").is_dir()
