"""A memory model's curriculum under torchrun (FSDP2 over `model.layers`, gloo): the same loss curve on one
and two ranks through every stage switch (freezing and re-initialising sharded parameters)."""
import json

import pytest

from tests.dist.conftest import torchrun
from tests.e2e.conftest import MICRO, run_cli

pytestmark = pytest.mark.timeout(900)

MEMORY = [
    "memory_model.chunks=4", "memory_model.n_ctx=16",
    "memory_model.encoder={d_model: 32, n_layers: 1, n_heads: 2, head_dim: 16, ffn_hidden: 64}",
    "memory_model.decoder={d_model: 32, n_layers: 1, n_heads: 2, head_dim: 16, ffn_hidden: 64}",
    "memory_model.stages=[{name: ae, steps: 2, objective: autoencode}, {name: blank, steps: 2, objective: blank_copy, "
    "freeze: [encoder_blocks], reinit: [encoder_embedding]}, {name: comb, steps: 2, objective: combined, "
    "freeze: [encoder_blocks]}]",
    "train.global_batch_size=4", "train.micro_batch_size=2", "train.checkpoint_every=2", "train.log_every=1",
    "logging.mlflow=false", "train.progress=false", "parallel.timeout_s=60",
]


def test_memory_model_curriculum_is_the_same_on_one_and_two_ranks(tmp_path):
    corpus = tmp_path / "corpus"
    run_cli("data", "synth", "--out", str(corpus), "--people", "20", "--documents", "80", cwd=tmp_path)
    overrides = [*MICRO, "memory.units=[8,4]", f"data.documents={corpus / 'documents.jsonl.gz'}",
                 f"data.prepared={tmp_path / 'prepared'}", *MEMORY]
    run_cli("data", "prepare", "--config", "memory-tiny", *overrides, cwd=tmp_path)
    curves = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"run{nproc}"
        args = ["train", "--config", "memory-tiny", *overrides, f"train.run_dir={run_dir}"]
        if nproc == 1:
            run_cli(*args, cwd=tmp_path)
        else:
            torchrun(nproc, ["-m", "hmtrain.cli", *args], cwd=tmp_path)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[nproc] = [r["loss"] for r in rows]
    assert len(curves[1]) == 6
    assert curves[2] == pytest.approx(curves[1], rel=1e-5, abs=1e-6)
