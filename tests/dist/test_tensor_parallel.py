"""`hmtrain train` with parallel.tensor_parallel=2 under torchrun (gloo): the anchor-only run (the pretrain phase,
QK-norm on) follows the one-process loss curve and validation loss on the same global batches, on 2 ranks
(TP 2) and on 4 (TP 2 x DP 2)."""
import json

import pytest

from tests.dist.conftest import prepare_four_subtrees, torchrun
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.timeout(900)

# 8 sequences per step; the pretrain phase alone (no memory: not split across tensor-parallel ranks yet)
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.pretrain_steps=4", "train.memory_steps=0",
         "train.checkpoint_every=4", "train.log_every=1", "train.eval_every=2", "logging.mlflow=false",
         "train.progress=false", "train.anchor_optim.lr=3e-3", "train.clip_grad=1.0", "parallel.timeout_s=60"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return prepare_four_subtrees(tmp_path_factory.mktemp("tp"), people=20, documents=80, branching="[2,3]")


def train(data, run_dir, nproc, *extra):
    args = ["train", "--config", "tiny", *data["overrides"], *TRAIN, f"train.run_dir={run_dir}", *extra]
    if nproc == 1:
        run_cli(*args, cwd=run_dir.parent)
    else:
        torchrun(nproc, ["-m", "hmtrain.cli", *args], cwd=run_dir.parent)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(rows, key) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    return train(data, tmp_path_factory.mktemp("one") / "run", 1)


@pytest.mark.parametrize("nproc", [2, 4], ids=["tp2", "tp2xdp2"])
def test_tensor_parallel_matches_one_process(data, one_process, tmp_path, nproc):
    rows = train(data, tmp_path / "run", nproc, "parallel.tensor_parallel=2")
    for key in ("loss", "grad_norm", "val/loss"):
        expected, got = curve(one_process, key), curve(rows, key)
        assert got.keys() == expected.keys() and got, f"{key}: steps {sorted(got)} vs {sorted(expected)}"
        for step in expected:  # float tolerance: the split sums in another order
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-6), f"{key} at step {step}"
