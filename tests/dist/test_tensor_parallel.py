"""`hmtrain train` with parallel.tensor_parallel=2 under torchrun (gloo): the anchor-only run (the pretrain phase,
QK-norm on) follows the one-process loss curve and validation loss on the same global batches, on 2 ranks
(TP 2) and on 4 (TP 2 x DP 2, activation checkpointing on), and the dense baseline with an untied head (TP 2);
its checkpoints reshard from TP 2 to one process and back. With the memory on (both phases), each
tensor-parallel rank holds its half of every row's units: TP 2 and TP 2 x DP 2 (gather placement), and
TP 2 x DP 4 (owner placement's groups of 2) follow the one-process curves and end with its bank, and the
checkpoints reshard the units from TP 2 to one process and back."""
import json
import shutil

import pytest
import torch

from tests.dist.conftest import prepare_four_subtrees, torchrun
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.timeout(900)

# 8 sequences per step; the pretrain phase alone
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.pretrain_steps=4", "train.memory_steps=0",
         "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=2", "logging.mlflow=false",
         "train.progress=false", "train.anchor_optim.lr=3e-3", "train.clip_grad=1.0", "parallel.timeout_s=60"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return prepare_four_subtrees(tmp_path_factory.mktemp("tp"), people=20, documents=80, branching="[2,3]")


# both phases: 2 pretrain steps, then 2 with the memory (the units [8, 4] halve, the generic row's 12 too)
MEMORY = ["train.pretrain_steps=2", "train.memory_steps=2", "train.checkpoint_every=3", "train.anchor=cotrain",
          "train.memory_optim.lr=3e-2"]


def train(data, run_dir, nproc, *extra, resume=False):
    args = ["train", "--config", "tiny", *data["overrides"], *TRAIN, *extra, f"train.run_dir={run_dir}",
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


def rewound_copy(source, run_dir, step: int):
    """A copy of a finished 4-step run whose latest checkpoint is `step`'s, as if killed after it; its checkpoints."""
    shutil.copytree(source, run_dir)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f"step_{step:08d}").is_dir()
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text(f"step_{step:08d}")
    return checkpoints


@pytest.mark.parametrize("before, after", [("tp2", 1), ("one_process", 2)], ids=["tp2_to_1", "1_to_tp2"])
def test_checkpoints_reshard_across_tensor_parallel_degrees(data, one_process, tmp_path, request, before, after):
    """Back to the first leg's step-2 checkpoint, then steps 3 and 4 on the other layout."""
    run_dir = tmp_path / "run"
    checkpoints = rewound_copy(request.getfixturevalue(before)[0], run_dir, step=2)
    rows = train(data, run_dir, after, f"parallel.tensor_parallel={after}", resume=True)
    assert (checkpoints / "step_00000004").is_dir()
    assert_same_curves(one_process[1], rows)  # (the resumed steps' rows replace the first leg's)


def assert_same_curves(expected_rows, rows):
    for key in ("loss", "grad_norm", "val/loss"):
        expected, got = curve(expected_rows, key), curve(rows, key)
        assert got.keys() == expected.keys() and got, f"{key}: steps {sorted(got)} vs {sorted(expected)}"
        for step in expected:  # float tolerance: the split sums in another order
            assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-6), f"{key} at step {step}"


@pytest.fixture(scope="module")
def one_process_memory(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_memory") / "run"
    return run_dir, train(data, run_dir, 1, *MEMORY)


@pytest.fixture(scope="module")
def tp2_memory(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2_memory") / "run"
    # step 3's checkpoint written in the background (DCP's stager copies the 2-D bank DTensors); the last, blocking
    return run_dir, train(data, run_dir, 2, *MEMORY, "parallel.tensor_parallel=2", "train.async_checkpoint=true")


def bank_tables(run_dir) -> dict:
    """The bank a run's last checkpoint holds, whole: every rank's unit slice in its place (DCP's DTensors)."""
    from hmtrain.eval.loading import load_trained

    return {name: table.clone() for name, table in load_trained(run_dir).bank.tables.items()}


def assert_same_bank(expected_dir, run_dir):
    expected, got = bank_tables(expected_dir), bank_tables(run_dir)
    assert got.keys() == expected.keys() == {"level1", "level2", "generic"}
    for name, table in expected.items():
        assert got[name].shape == table.shape  # [rows, layers, slots, units, d]: the whole rows
        # each rank's half of the units is the one-process bank's matching half (rank r: units r*m/2 ..)
        for half in range(2):
            units = table.shape[3] // 2
            torch.testing.assert_close(got[name].narrow(3, half * units, units),
                                       table.narrow(3, half * units, units), rtol=1e-3, atol=1e-5,
                                       msg=lambda m: f"{name}, units of rank {half}: {m}")
            # the down rows start at zero: both halves trained
            assert got[name].narrow(3, half * units, units)[:, :, 2].abs().sum() > 0, f"{name}: rank {half}"


def test_tensor_parallel_2_with_the_memory_matches_one_process(one_process_memory, tp2_memory):
    assert_same_curves(one_process_memory[1], tp2_memory[1])
    assert {r["step"] for r in tp2_memory[1] if "loss" in r} == {1, 2, 3, 4}
    assert_same_bank(one_process_memory[0], tp2_memory[0])


def test_tensor_parallel_2_by_data_parallel_2_with_the_memory_matches_one_process(data, tmp_path):
    """The anchor frozen in the memory phase, so the gradient norm there is the bank's alone, summed over the
    data- and tensor-parallel ranks; level 1 kept whole on every data-parallel rank (ZeRO-1 over dp)."""
    frozen = [*MEMORY, "train.anchor=frozen", "parallel.replicate_levels=1"]
    one_dir, run_dir = tmp_path / "one" / "run", tmp_path / "tp2dp2" / "run"
    one_dir.parent.mkdir(), run_dir.parent.mkdir()
    expected = train(data, one_dir, 1, *frozen)
    rows = train(data, run_dir, 4, *frozen, "parallel.tensor_parallel=2")
    assert_same_curves(expected, rows)
    assert_same_bank(one_dir, run_dir)


def test_owner_placement_under_tensor_parallel_2_by_data_parallel_4_matches_one_process(data, one_process_memory,
                                                                                      tmp_path):
    """8 ranks: 4 data-parallel ones in 2 owner groups of 2 (one level-1 subtree each: its rows sharded over the
    group's 2 ranks, level 1 kept whole in the group), each of their tensor-parallel ranks half of every unit."""
    run_dir = tmp_path / "run"
    rows = train(data, run_dir, 8, *MEMORY, "parallel.tensor_parallel=2", "parallel.placement=owner",
                 "parallel.replicate_levels=1")
    assert_same_curves(one_process_memory[1], rows)
    assert_same_bank(one_process_memory[0], run_dir)


@pytest.mark.parametrize("before, nproc, after", [("tp2_memory", 1, 1), ("one_process_memory", 4, 2)],
                         ids=["tp2_to_1", "1_to_tp2_dp2"])
def test_the_bank_reshards_its_units_across_tensor_parallel_degrees(data, one_process_memory, tmp_path, request,
                                                                    before, nproc, after):
    """Back to the first leg's step-3 checkpoint (the memory phase's first step), then step 4 on the other layout
    (TP 2 -> one process; one process -> TP 2 x DP 2: units split, rows sharded)."""
    run_dir = tmp_path / "run"
    checkpoints = rewound_copy(request.getfixturevalue(before)[0], run_dir, step=3)
    rows = train(data, run_dir, nproc, *MEMORY, f"parallel.tensor_parallel={after}", resume=True)
    assert (checkpoints / "step_00000004").is_dir()
    assert_same_curves(one_process_memory[1], rows)
    assert_same_bank(one_process_memory[0], run_dir)
