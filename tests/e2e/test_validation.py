"""Validation during training (`train.eval_every`, hmtrain/train/validation.py) on one process: it changes
nothing of the training, and its numbers at step N are `hmtrain eval`'s held-out numbers (and probe accuracy,
`train.eval_probes`) of the step-N checkpoint on the same sequences (and probes)."""
import json
import math

import pytest
import torch

from hmtrain.config import ConfigError, load_config
from hmtrain.data.corpus.probes import balanced_probes, bucket_counts, load_probes
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.questions import route_probes
from hmtrain.eval.evaluate import evaluate
from hmtrain.eval.loading import load_trained
from hmtrain.eval.probes import probe_accuracy
from hmtrain.eval.tracking import metric_key
from tests.e2e.conftest import run_cli

# 2 anchor steps, then 4 memory steps; a checkpoint at every validated step
TRAIN = ["train.pretrain_steps=2", "train.memory_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=10",
         "train.memory_optim.lr=3e-2", "train.anchor=cotrain", "logging.mlflow=false"]
# 6 sequences in micro-batches of 4: the second micro-batch is padded; 13 probes' pairs do not fill whole batches
VALIDATION = ["train.eval_every=2", "train.eval_sequences=6", "train.eval_variants=true", "train.eval_probes=13"]
PROBE_KEYS = {"fetched": "val/probe_acc", "generic": "val/probe_acc_generic", "none": "val/probe_acc_anchor"}


def records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("validation")
    out = {}
    for name, extra in (("off", []), ("on", VALIDATION)):
        out[name] = root / name
        run_cli("train", "--config", "tiny", *prepared["overrides"], *TRAIN, *extra, f"train.run_dir={out[name]}",
                cwd=root)
    return out


def test_validation_leaves_training_bit_for_bit_unchanged(runs):
    off, on = records(runs["off"]), records(runs["on"])
    assert off.keys() == on.keys() == set(range(1, 7))
    for step in off:
        assert on[step]["loss"] == off[step]["loss"], step
        assert on[step]["grad_norm"] == off[step]["grad_norm"], step
    assert not any(key.startswith("val/") for r in off.values() for key in r)
    assert [s for s, r in on.items() if "val/loss" in r] == [2, 4, 6]
    banks = [load_trained(runs[name]).bank.tables for name in ("off", "on")]
    for name in banks[0]:
        assert torch.equal(banks[0][name], banks[1][name]), name


def test_validation_equals_eval_of_the_checkpoint(prepared, runs):
    on = records(runs["on"])
    cfg = load_config("tiny", [*prepared["overrides"], "eval.batch_size=6", "eval.max_sequences=6"])
    for step in (2, 4, 6):
        results = evaluate(cfg, runs["on"] / "checkpoints" / f"step_{step:08d}", progress=False)
        rows = {row["variant"]: row for row in results["rows"]}
        val = on[step]
        # step 2 ends anchor pretraining: the anchor alone is scored; then the fetched memory
        trained = rows["none"] if step == 2 else rows["fetched"]
        assert val["val/tokens"] == trained["tokens"]
        assert val["val/loss"] == pytest.approx(trained["nll"], rel=1e-5), step
        assert val["val/ppl"] == pytest.approx(trained["perplexity"], rel=1e-5), step
        if step > 2:
            assert val["val/ppl_generic"] == pytest.approx(rows["generic"]["perplexity"], rel=1e-5), step
            assert val["val/ppl_anchor"] == pytest.approx(rows["none"]["perplexity"], rel=1e-5), step
            assert math.isclose(val["val/ppl"], math.exp(val["val/loss"]))
    # the memory trains: fetched memory helps on held-out text by the end
    assert on[6]["val/ppl"] < on[6]["val/ppl_anchor"]


def validation_probes(prepared) -> list[dict]:
    return balanced_probes(load_probes(prepared["root"] / "corpus" / "probes.jsonl"), 13)


def test_probe_accuracy_is_logged_per_bucket_at_each_validation(prepared, runs):
    on, counts = records(runs["on"]), bucket_counts(validation_probes(prepared))
    assert sum(counts.values()) == 13 and len(counts) > 1
    for step, record in on.items():
        logged = {key for key in record if key.startswith("val/probe_acc")}
        if step not in (2, 4, 6):
            assert not logged, step
            continue
        # anchor pretraining (step 2) scores the anchor alone, as val/ppl does; then every variant
        for prefix in ([PROBE_KEYS["fetched"]] if step == 2 else PROBE_KEYS.values()):
            accuracy = {b: record[f"{prefix}/{metric_key(b)}"] for b in counts}
            assert all(0.0 <= a <= 1.0 for a in accuracy.values()), (step, prefix)
            weighted = sum(accuracy[b] * n for b, n in counts.items()) / sum(counts.values())
            assert record[f"{prefix}/all"] == pytest.approx(weighted, abs=1e-12), (step, prefix)
        assert len(logged) == (len(counts) + 1) * (1 if step == 2 else 3), step


def test_probe_accuracy_equals_the_eval_scorer_on_the_checkpoint(prepared, runs):
    """The same probes, scored by `hmtrain eval`'s `probe_accuracy` on each validated step's checkpoint."""
    data = PreparedData.open(prepared["root"] / "prepared")
    probe_set = route_probes(data, validation_probes(prepared), progress=False, device="cpu")
    on = records(runs["on"])
    for step in (2, 4, 6):
        trained = load_trained(runs["on"] / "checkpoints" / f"step_{step:08d}")
        for variant in (["none"] if step == 2 else ["fetched", "generic", "none"]):
            prefix = PROBE_KEYS["fetched" if step == 2 else variant]
            want = probe_accuracy(trained.model, trained.bank, variant, probe_set, data, torch.device("cpu"))
            got = {b: on[step][f"{prefix}/{metric_key(b)}"] for b in want}
            assert got == pytest.approx(want, abs=1e-12), (step, variant)


def test_bad_validation_keys_are_named():
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config("tiny", ["train.eval_every=-1"])
    with pytest.raises(ConfigError, match="train.eval_sequences"):
        load_config("tiny", ["train.eval_sequences=-3"])
    with pytest.raises(ConfigError, match="train.eval_probes.*must be >= 0"):
        load_config("tiny", ["train.eval_probes=-1"])
    with pytest.raises(ConfigError, match="train.eval_probes.*data.probes"):
        load_config("tiny", ["train.eval_every=5", "train.eval_probes=8", "data.probes=null"])
