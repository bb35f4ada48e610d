"""Validation during training under torchrun with gloo: 2 ranks score the held-out split and the probes as one
process does, under gather placement (rows cross ranks) and owner placement (each rank scores its own subtrees'
sequences and the probes routed to them), and equal `hmtrain eval` of their own checkpoint."""
import json

import pytest

from hmtrain.config import load_config
from hmtrain.eval.evaluate import evaluate
from tests.dist.conftest import prepare_four_subtrees, torchrun
from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.timeout(600)

# all held-out sequences in micro-batches of 2: the ranks' shares differ, so padded rounds are run
TRAIN = ["train.global_batch_size=4", "train.micro_batch_size=2", "train.pretrain_steps=1", "train.memory_steps=2",
         "train.checkpoint_every=3", "train.log_every=1", "logging.mlflow=false", "train.progress=false",
         "train.memory_optim.lr=3e-2", "train.eval_every=1", "train.eval_variants=true", "parallel.timeout_s=60",
         "train.eval_probes=11"]  # 11 probes over 4 subtrees: the ranks' shares of pairs differ too


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return prepare_four_subtrees(tmp_path_factory.mktemp("val_dist"), people=30, documents=160)


def train(data, name: str, nproc: int, *extra: str):
    run_dir = data["root"] / name
    args = ["train", "--config", "tiny", *data["overrides"], *TRAIN, f"train.run_dir={run_dir}",
            f"data.probes={data['root'] / 'corpus' / 'probes.jsonl'}", *extra]
    if nproc == 1:
        run_cli(*args, cwd=data["root"])
    else:
        torchrun(nproc, ["-m", "hmtrain.cli", *args], cwd=data["root"])
    return run_dir


def validation(run_dir) -> dict[int, dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val/") and k != "val/seconds"} for r in rows}


def test_two_ranks_validate_as_one_process_and_as_eval(data):
    one = validation(train(data, "one", 1))
    assert set(one) == {1, 2, 3} and all("val/loss" in v for v in one.values())
    assert {"val/ppl_generic", "val/ppl_anchor", "val/probe_acc/all", "val/probe_acc_anchor/all"} <= set(one[3])
    cfg = load_config("tiny", [*data["overrides"], "eval.batch_size=2"])
    for name, extra in (("gather", []), ("owner", ["parallel.placement=owner"])):
        run_dir = train(data, name, 2, *extra)
        two = validation(run_dir)
        assert two.keys() == one.keys(), name
        for step in one:
            assert two[step].keys() == one[step].keys(), (name, step)
            assert two[step]["val/tokens"] == one[step]["val/tokens"], (name, step)
            probes = {k: v for k, v in one[step].items() if k.startswith("val/probe_acc")}
            assert probes and {k: two[step][k] for k in probes} == probes, (name, step)
            for key, value in one[step].items():
                # the weights themselves differ by float rounding between world sizes (tests/dist: 1e-4)
                assert two[step][key] == pytest.approx(value, rel=1e-4), (name, step, key)
        # at the same weights: what `hmtrain eval` reads from the 2-rank run's last checkpoint, on one process
        rows = {r["variant"]: r for r in evaluate(cfg, run_dir / "checkpoints" / "step_00000003",
                                                  progress=False)["rows"]}
        assert two[3]["val/loss"] == pytest.approx(rows["fetched"]["nll"], rel=1e-5), name
        assert two[3]["val/ppl_generic"] == pytest.approx(rows["generic"]["perplexity"], rel=1e-5), name
        assert two[3]["val/ppl_anchor"] == pytest.approx(rows["none"]["perplexity"], rel=1e-5), name
