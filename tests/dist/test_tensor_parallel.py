"""`hmtrain train` with parallel.tensor_parallel=2 under torchrun (gloo): the anchor-only run (the pretrain phase,
QK-norm on) follows the one-process loss curve and validation loss on the same global batches, on 2 ranks
(TP 2) and on 4 (TP 2 x DP 2, activation checkpointing on); its checkpoints reshard from TP 2 to one process
and back."""
import json
import shutil

import pytest

from tests.dist.conftest import prepare_four_subtrees, torchrun
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.timeout(900)

# 8 sequences per step; the pretrain phase alone (no memory: not split across tensor-parallel ranks yet)
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.pretrain_steps=4", "train.memory_steps=0",
         "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=2", "logging.mlflow=false",
         "train.progress=false", "train.anchor_optim.lr=3e-3", "train.clip_grad=1.0", "parallel.timeout_s=60"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return prepare_four_subtrees(tmp_path_factory.mktemp("tp"), people=20, documents=80, branching="[2,3]")


def train(data, run_dir, nproc, *extra, resume=False):
    args = ["train", "--config", "tiny", *data["overrides"], *TRAIN, f"train.run_dir={run_dir}", *extra,
            *(["--resume"] if resume else [])]
    if nproc == 1:
        run_cli(*args, cwd=run_dir.parent)
    else:
        torchrun(nproc, ["-m", "hmtrain.cli", *args], cwd=run_dir.parent)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(rows, key) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return run_dir, train(data, run_dir, 1)


@pytest.fixture(scope="module")
def tp2(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2") / "run"
    return run_dir, train(data, run_dir, 2, "parallel.tensor_parallel=2")


def test_tensor_parallel_2_matches_one_process(one_process, tp2):
    assert_same_curves(one_process[1], tp2[1])


def test_tensor_parallel_2_by_data_parallel_2_matches_one_process(data, one_process, tmp_path):
    # with activation checkpointing (applied after the split): the recomputed forward repeats its collectives
    rows = train(data, tmp_path / "run", 4, "parallel.tensor_parallel=2", "parallel.activation_checkpointing=true")
    assert_same_curves(one_process[1], rows)


# the dense baseline of this anchor: 6 heads of 8, 96 FFN units, d_model 48 (train.dense_multiplier=2); its own head
DENSE = ["train.mode=dense", "model.n_heads=4", "model.head_dim=8", "model.tie_embeddings=false"]


def test_dense_mode_with_an_untied_head_matches_one_process(data, tmp_path):
    """train.mode=dense under tensor parallelism, with a head of its own (the other tests' tiny anchor ties it):
    the vocabulary-parallel embedding, head and loss give the one-process curves on 2 ranks."""
    (tmp_path / "one").mkdir()
    (tmp_path / "tp2").mkdir()
    one = train(data, tmp_path / "one" / "run", 1, *DENSE)
    assert_same_curves(one, train(data, tmp_path / "tp2" / "run", 2, *DENSE, "parallel.tensor_parallel=2"))


@pytest.mark.parametrize("before, after", [("tp2", 1), ("one_process", 2)], ids=["tp2_to_1", "1_to_tp2"])
def test_checkpoints_reshard_across_tensor_parallel_degrees(data, one_process, tmp_path, request, before, after):
    """Back to the first leg's step-2 checkpoint, then steps 3 and 4 on the other layout."""
    run_dir = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(before)[0], run_dir)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_00000002").is_dir()
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002")
    rows = train(data, run_dir, after, f"parallel.tensor_parallel={after}", resume=True)
    assert (checkpoints / "step_00000004").is_dir()
    assert_same_curves(one_process[1], rows)  # (the resumed steps' rows replace the first leg's)


def assert_same_curves(expected_rows, rows):
    for key in ("loss", "grad_norm", "val/loss"):
        expected, got = curve(expected_rows, key), curve(rows, key)
        assert got.keys() == expected.keys() and got, f"{key}: steps {sorted(got)} vs {sorted(expected)}"
        for step in expected:  # float tolerance: the split sums in another order
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-6), f"{key} at step {step}"
