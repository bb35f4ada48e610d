"""The post-hoc recipe on a tiny HF Llama: its own tokenizer, frozen anchor, memory phase alone."""
import json

import torch
from safetensors.torch import load_file

from hmtrain.eval.loading import load_trained
from tests.e2e.conftest import run_cli
from tests.hf_models import save_tiny

SMALL = ["model.document_mask=false", "memory.units=[8,4]", "tree.branching=[2,3]", "data.seq_len=64",
         "data.embedder=hashing", "data.shard_samples=16", "data.heldout_fraction=0.1", "train.global_batch_size=4",
         "train.micro_batch_size=4", "train.progress=false", "train.log_every=1"]


def test_posthoc_memory_phase_keeps_the_anchor_and_lowers_the_loss(prepared, tmp_path):
    model_dir = save_tiny("llama", tmp_path / "llama")
    corpus = prepared["root"] / "corpus"
    hf = [f"model.hf_path={model_dir}", *SMALL]
    run_cli("data", "prepare", "--config", "posthoc-tiny", *hf, f"data.documents={corpus / 'documents.jsonl.gz'}",
            f"data.prepared={tmp_path / 'prep'}", cwd=tmp_path)
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["tokenizer_name"].startswith("hf-") and manifest["eot_id"] == 256

    # data prepared with another tokenizer (the session's byte tokenizer) is refused by name
    refused = run_cli("train", "--config", "posthoc-tiny", *hf, f"data.prepared={prepared['root'] / 'prepared'}",
                      f"train.run_dir={tmp_path / 'refused'}", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "not the anchor's own" in refused.stderr

    run_cli("train", "--config", "posthoc-tiny", *hf, f"data.prepared={tmp_path / 'prep'}", "train.memory_steps=40",
            "train.checkpoint_every=40", "train.memory_optim.lr=1e-2", f"train.run_dir={tmp_path / 'run'}",
            cwd=tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05  # the memory learned (anchor frozen)

    trained = load_trained(tmp_path / "run")  # the checkpoint, as eval reads it
    assert trained.step == 40 and trained.bank is not None
    original = load_file(model_dir / "model.safetensors")
    checked = 0
    for name, value in trained.model.state_dict().items():
        key = name.removeprefix("hf.")
        if key in original:
            assert torch.equal(value, original[key]), name  # bit-identical after the memory phase
            checked += 1
    assert checked == len(original)
    # the export format holds hmtrain's own anchor: an HF run is refused in one line, nothing written
    refused = run_cli("export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exported"),
                      cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "model.family=hf" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "exported").exists()
