"""`hmtrain train` under torchrun with gloo: the loss curve and the bank do not depend on the world size,
the placement or the engine; checkpoints reshard to another world size; a run resumes exactly from a
checkpoint written in the background; a dead rank ends the job."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.dist.conftest import REPO, free_port, prepare_four_subtrees, torchrun
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.timeout(1200)

# 12 sequences per step: 6 micro-batches of 2 on one rank, 3 on two ranks, 2 on three
TRAIN = ["train.global_batch_size=12", "train.micro_batch_size=2", "train.pretrain_steps=2", "train.memory_steps=3",
         "train.checkpoint_every=5", "train.log_every=1", "logging.mlflow=false", "train.progress=false",
         "train.anchor=cotrain", "train.anchor_optim.lr=3e-3", "train.memory_optim.lr=3e-2", "train.clip_grad=1.0",
         "parallel.timeout_s=60"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A prepared corpus whose tree has 2 level-1 subtrees, so owner placement on 4 ranks forms 2 groups of 2
    ranks, and on 3 ranks one group of 3."""
    return prepare_four_subtrees(tmp_path_factory.mktemp("dist"), people=40, documents=240, branching="[2,4]")


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The one-process run of TRAIN, uninterrupted: the reference every other run must match."""
    tmp_path = tmp_path_factory.mktemp("straight")
    return train(data, tmp_path, "one", 1)


def train(data, tmp_path, name, nproc, *extra, resume=False):
    run_dir = tmp_path / name
    args = ["-m", "hmtrain.cli", "train", "--config", "tiny", *data["overrides"], *TRAIN,
            f"train.run_dir={run_dir}", *extra]
    if resume:
        args.append("--resume")
    if nproc == 1:
        run_cli(*args[2:], cwd=tmp_path)
    else:
        torchrun(nproc, args, cwd=tmp_path)
    return run_dir


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def last_metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def bank(run_dir) -> dict:
    from hmtrain.eval.loading import load_trained

    return {k: v.clone() for k, v in load_trained(run_dir).bank.tables.items()}


def assert_same_run(a, b, what):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() == set(range(1, 6)), what
    for step in la:
        # float tolerance: summation order differs across ranks, and Adam at lr 3e-2 amplifies it step by step
        assert la[step] == pytest.approx(lb[step], rel=1e-4, abs=1e-6), f"{what}: step {step}: {la} vs {lb}"
    ba, bb = bank(a), bank(b)
    for name in ba:
        # Adam turns float-rounding differences of near-zero gradients into ~1e-3 of one step (lr 3e-2);
        # a real difference (a row missed, a gradient scaled) moves whole rows by about the learning rate
        torch.testing.assert_close(ba[name], bb[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{what}: {name}: {m}")


def test_world_size_placement_and_engine_do_not_change_training(data, straight, tmp_path):
    first = losses(straight)
    assert first[5] < first[1], "the run must learn"
    runs = {}
    for name, nproc, extra in [("fsdp2", 2, []),
                               # 2 groups of 2 ranks: level 1 kept whole in each group, level 2 cut inside it
                               ("fsdp4_owner", 4, ["parallel.placement=owner", "parallel.replicate_levels=1",
                                                 "train.micro_batch_size=3"]),
                               ("fsdp2_replicated", 2, ["parallel.replicate_levels=1"]),
                               ("zero2", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
                               # owner placement pads micro-batches and can run more than DeepSpeed's accumulation
                               ("zero2_owner", 3, ["parallel.placement=owner", "parallel.engine=deepspeed"])]:
        runs[name] = train(data, tmp_path, name, nproc, *extra)
        assert_same_run(straight, runs[name], name)
    # only fetched rows cross the network: gather placement moves deep rows; owner placement moves none of
    # the level its groups keep whole, and level 2's only inside a group (tests/dist/test_bank_distributed.py)
    gathered, owned = last_metrics(runs["fsdp2"]), last_metrics(runs["fsdp4_owner"])
    row_bytes = 2 * 3 * 32 * 4 * 4  # level2: 2 layers x 3 x d 32 x 4 units, fp32
    assert gathered["memory/level2/bytes_fetched"] > 0
    assert gathered["memory/level2/bytes_fetched"] % row_bytes == 0
    assert gathered["memory/level2/bytes_returned"] == gathered["memory/level2/bytes_fetched"]
    assert owned["memory/level1/bytes_fetched"] == 0 and owned["memory/level2/bytes_fetched"] % row_bytes == 0
    assert "memory/tokens/imbalance" in owned and owned["memory/tokens/imbalance"] >= 1.0


def test_deepspeed_zero1_under_bf16_matches_one_process(data, tmp_path):
    # bf16 with fp32 gradient accumulation makes ZeRO-1 DeepSpeed's BF16_Optimizer, whose gradient norm
    # (for the global clip) hmtrain reads another way than ZeRO-2's or -3's
    bf16 = ["train.dtype=bf16", "memory.dtype=bf16", "train.memory_steps=2"]
    one = train(data, tmp_path, "one_bf16", 1, *bf16)
    zero1 = train(data, tmp_path, "zero1_bf16", 2, *bf16, "parallel.engine=deepspeed", "parallel.zero_stage=1")
    rows = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for name, run in (("one", one), ("zero1", zero1))}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["zero1"]] == [1, 2, 3, 4]
    for a, b in zip(rows["one"], rows["zero1"]):
        # bf16 compute: the ranks round differently (measured: losses 4e-4, norms 4e-3 apart at most)
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-2), a["step"]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_checkpoints_reshard_to_another_world_size(data, straight, tmp_path, before, after):
    split = ["train.checkpoint_every=3"]
    # the first leg's one checkpoint is its last step's, which is saved blocking even with async_checkpoint
    run = train(data, tmp_path, "run", before, *split, "train.memory_steps=1", "train.async_checkpoint=true")
    assert (run / "checkpoints" / "step_00000003").is_dir()
    train(data, tmp_path, "run", after, *split, resume=True)
    assert_same_run(straight, run, f"{before} -> {after} ranks")


def test_a_run_resumes_exactly_from_a_checkpoint_written_in_the_background(data, straight, tmp_path):
    """Every step but the last is saved in the background (dcp.async_save) while the next one trains. The bank's
    replicated tables (level 1, the generic row) make every rank stage a slice of its own; the bank's control
    collectives, which run every step, keep to their own gloo group, as on NCCL: shared with the background
    save's, the two interleave differently per rank and the job hangs."""
    background = ["train.checkpoint_every=1", "train.async_checkpoint=true", "parallel.replicate_levels=1"]
    run = train(data, tmp_path, "run", 2, *background)
    assert_same_run(straight, run, "checkpoints written in the background")
    # resume from step 4's background save, as a run killed during step 5's (blocking) save would
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step_00000004" / "trainer.json").is_file()
    shutil.rmtree(checkpoints / "step_00000005")
    (checkpoints / "latest").write_text("step_00000004")
    train(data, tmp_path, "run", 2, *background, resume=True)
    assert_same_run(straight, run, "resumed from a background save")


def test_a_dead_rank_ends_the_job_and_the_checkpoint_resumes(data, tmp_path):
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--max_restarts", "0", "-m", "hmtrain.cli", "train", "--config", "tiny",
            *data["overrides"], *TRAIN, "train.pretrain_steps=40", "train.memory_steps=40", "train.checkpoint_every=2",
            f"train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    marker = run_dir / "checkpoints" / "step_00000004" / "trainer.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "no checkpoint before the kill"
    workers = subprocess.run(["pgrep", "-f", f"train.run_dir={run_dir}"], capture_output=True, text=True).stdout.split()
    victim = max(int(pid) for pid in workers if int(pid) != proc.pid)  # a worker, not torchrun itself
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60, "the job outlived its dead rank by a minute"
    train(data, tmp_path, "killed", 2, "train.pretrain_steps=40", "train.memory_steps=40",
          "train.checkpoint_every=2", resume=True)
    assert sorted(losses(run_dir)) == list(range(1, 81))


def test_a_diverging_run_stops_on_every_rank_before_checkpointing_the_damage(data, tmp_path):
    # no step is logged before the end (log_every=10): the ranks read the note before each checkpoint
    run_dir = tmp_path / "diverged"
    proc = torchrun(2, ["-m", "hmtrain.cli", "train", "--config", "tiny", *data["overrides"], *TRAIN,
                        "train.memory_optim.lr=1e30", "train.log_every=10", "train.checkpoint_every=2",
                        f"train.run_dir={run_dir}"], cwd=tmp_path, check=False)
    lines = sorted(line for line in proc.stderr.splitlines() if line.startswith("hmtrain train"))
    assert len(lines) == 2 and lines[0].startswith("hmtrain train (rank 0): error: training diverged"), proc.stderr
    assert lines[1] == lines[0].replace("(rank 0)", "(rank 1)")  # the same step on both ranks
    assert "train.memory_optim.lr" in lines[0] and "step_00000002, predates it" in lines[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002"]


def test_a_mixed_width_memory_kind_trains_on_two_ranks_as_on_one(data, tmp_path):
    """lora_ffn rows hold slots of two widths (d and d_ff), flattened per layer: fetched across ranks, their
    gradients returned and reduced, and updated as one process does."""
    kind = ["memory.kind=lora_ffn"]
    assert_same_run(train(data, tmp_path, "one", 1, *kind), train(data, tmp_path, "two", 2, *kind), "lora_ffn")
