"""`hmtrain eval` on a model trained without the generic memory, with a user's own probe buckets."""
import json

from tests.e2e.conftest import run_cli


def test_eval_without_generic_memory_and_user_buckets_in_order(prepared, tmp_path):
    root, overrides = prepared["root"], prepared["overrides"]
    run = tmp_path / "nogeneric"
    run_cli("train", "--config", "tiny", *overrides, "memory.generic=false", "train.pretrain_steps=2",
            "train.memory_steps=2", "train.checkpoint_every=2", "logging.mlflow=false", f"train.run_dir={run}",
            cwd=tmp_path)
    labels = ["10-99", "1-2", "100+", "3-9"]  # first seen in this (wrong) order
    probes = [json.loads(line) for line in (root / "corpus" / "probes.jsonl").read_text().splitlines()][:40]
    for index, probe in enumerate(probes):
        probe["bucket"] = labels[index % len(labels)]
    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text("".join(json.dumps(p) + "\n" for p in probes))
    out = tmp_path / "results.json"
    run_cli("eval", "--config", "tiny", *overrides, f"data.probes={probe_file}", "--checkpoint", str(run),
            "--out", str(out), cwd=tmp_path)
    results = json.loads(out.read_text())
    assert [row["name"] for row in results["rows"]] == ["anchor + fetched memory", "anchor alone"]
    for row in results["rows"]:
        assert list(row["probe_accuracy"]) == ["1-2", "3-9", "10-99", "100+", "all"]
    assert list(results["probes"]["per_bucket"]) == ["1-2", "3-9", "10-99", "100+"]
    assert sum(results["probes"]["per_bucket"].values()) == 40
