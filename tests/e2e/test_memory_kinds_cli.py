"""Memory kinds other than `ffn` (hmtrain/memory/kind.py) through the CLI: they train, a killed-and-resumed
run equals an uninterrupted one, `hmtrain eval` scores them, and an export generates what the checkpoint does."""
import json
import shutil

import pytest
import torch

from hmtrain.serve.export import export_checkpoint
from hmtrain.serve.generate import from_checkpoint, from_export
from tests.e2e.conftest import run_cli

STEPS = ["train.pretrain_steps=2", "train.memory_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=10",
         "train.memory_optim.lr=3e-2", "logging.mlflow=false"]
PROMPT = "She was born in the city of"


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("kind", ["lora_ffn", "kv"])
def test_a_memory_kind_trains_resumes_exports_and_generates(prepared, tmp_path, kind):
    args = ["--config", "tiny", *prepared["overrides"], *STEPS, f"memory.kind={kind}"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_cli("train", *args, f"train.run_dir={whole}", cwd=tmp_path)
    # the run as a crash after the step-4 checkpoint (inside the memory phase) leaves it, then resumed
    shutil.copytree(whole, split)
    shutil.rmtree(split / "checkpoints" / "step_00000006")
    run_cli("train", *args, f"train.run_dir={split}", "--resume", cwd=tmp_path)
    assert losses(split) == losses(whole)
    first, last = losses(whole)[3], losses(whole)[6]
    assert last < first, f"{kind}: memory-phase loss did not fall ({first} -> {last})"

    run_cli("eval", *args, "--checkpoint", str(whole), "--out", str(tmp_path / "results.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["variant"]: row for row in results["rows"]}
    assert rows["fetched"]["perplexity"] != rows["none"]["perplexity"], "the memory has no effect"

    out = tmp_path / "exported"
    export_checkpoint(whole, out)
    exported, checkpoint = from_export(out), from_checkpoint(whole)
    ids, path = exported.tokenizer.encode(PROMPT), exported.route(PROMPT)
    fetched = exported.next_logits(ids, exported.memory_for(path, "fetched"))
    assert torch.equal(fetched, checkpoint.next_logits(ids, checkpoint.memory_for(path, "fetched")))
    assert not torch.allclose(fetched, exported.next_logits(ids, exported.memory_for(path, "none")))
