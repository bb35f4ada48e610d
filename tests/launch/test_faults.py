"""Fault injection: a rank SIGKILLed where a crash hurts most, then the job resumed on another world size.

HMTRAIN_FAULT (hmtrain/util/faults.py) kills rank 1 of a 2-rank job while a background checkpoint is being
written, or as the memory phase begins. The resumed run (on 1 rank) must end with the loss curve of an
uninterrupted job (within the spread of world sizes, 4.5e-6 measured), every step once in metrics.jsonl and
MLflow alike, and one MLflow run.
"""
from __future__ import annotations

import json
import signal

import pytest
from mlflow.tracking import MlflowClient

from tests.dist.conftest import torchrun
from tests.e2e.conftest import run_cli

PRETRAIN, MEMORY = 4, 6


def args(prepared_data, run_dir, tracking, async_checkpoint=False):
    return ["train", "--config", "tiny", *prepared_data, "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.log_every=1", "train.progress=false", "parallel.timeout_s=30", f"train.run_dir={run_dir}",
            f"train.pretrain_steps={PRETRAIN}", f"train.memory_steps={MEMORY}", "train.checkpoint_every=3",
            f"train.async_checkpoint={str(async_checkpoint).lower()}", f"logging.tracking_uri={tracking}"]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def straight(prepared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    torchrun(2, ["-m", "hmtrain.cli", *args(prepared_data, root / "run", f"sqlite:///{root / 'mlflow.db'}")],
             cwd=root)
    return losses(root / "run")


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault, async_checkpoint", [("async_save@6:1", True), (f"phase_switch@{PRETRAIN}:1", False)])
def test_a_rank_killed_mid_job_resumes_on_one_rank_with_nothing_lost(prepared_data, straight, tmp_path, fault,
                                                                      async_checkpoint):
    run_dir, tracking = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    crashed = torchrun(2, ["-m", "hmtrain.cli", *args(prepared_data, run_dir, tracking, async_checkpoint)],
                       cwd=tmp_path, check=False, env={"HMTRAIN_FAULT": fault})
    assert crashed.returncode != 0, crashed.stderr[-4000:]
    assert f"exitcode  : -{int(signal.SIGKILL)}" in crashed.stderr or "Signal 9" in crashed.stderr, \
        crashed.stderr[-4000:]
    before = losses(run_dir)
    assert before and before[-1][0] < PRETRAIN + MEMORY

    run_cli(*args(prepared_data, run_dir, tracking, async_checkpoint), "--resume", cwd=tmp_path)
    resumed = losses(run_dir)
    assert [s for s, _ in resumed] == list(range(1, PRETRAIN + MEMORY + 1))
    for (_, got), (_, want) in zip(resumed, straight):
        assert got == pytest.approx(want, abs=2e-5)  # 2 -> 1 ranks: same data order, summation order differs

    client = MlflowClient(tracking_uri=tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("hmtrain").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == resumed, "MLflow must hold what metrics.jsonl holds, each step once"
    assert run.info.status == "FINISHED"
