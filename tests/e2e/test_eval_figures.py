"""`hmtrain eval --out`: its figures beside the results file, and results and figures in MLflow as a child of
the training run, with the results file's values."""
import json
from pathlib import Path

import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("long_tail", "subtree_perplexity", "tree_balance")
ROW_KEYS = {"anchor + fetched memory": "memory", "anchor + generic memory": "generic", "anchor alone": "anchor"}


def expected_metrics(results: dict) -> dict[str, float]:
    """README's MLflow names for the eval, written out here from the results file."""
    metrics = {}
    for row in results["rows"]:
        key = f"eval/{ROW_KEYS[row['name']]}"
        metrics[f"{key}/ppl"] = row["perplexity"]
        metrics.update({f"{key}/ppl/subtree_{n}": c["perplexity"] for n, c in row["subtrees"].items()})
        metrics.update({f"{key}/probe_acc/{b.replace('+', 'plus')}": a for b, a in row["probe_accuracy"].items()})
    metrics.update({f"eval/routing_agreement/level_{k[len('level'):]}": v
                    for k, v in results["routing_agreement"].items()})
    return metrics


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path}: {len(data)} bytes, too small to hold a drawn figure"
    pixels = imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 0.01, f"{path} is one colour"


@pytest.fixture(scope="module")
def evaluated(prepared, tmp_path_factory):
    overrides = prepared["overrides"]
    work = tmp_path_factory.mktemp("figures")
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    run_cli("train", "--config", "tiny", *overrides, "train.pretrain_steps=2", "train.memory_steps=2",
            "train.checkpoint_every=2", "logging.system_metrics=false", f"logging.tracking_uri={tracking}",
            f"train.run_dir={work / 'memory'}", cwd=work)
    out = work / "eval" / "results.json"
    proc = run_cli("eval", "--config", "tiny", *overrides, "--checkpoint", str(work / "memory"), "--out", str(out),
                   cwd=work)
    return {"work": work, "tracking": tracking, "out": out, "stdout": proc.stdout, "stderr": proc.stderr,
            "results": json.loads(out.read_text())}


def test_eval_shows_a_progress_bar_per_stage(evaluated):
    for row in ("anchor + fetched memory", "anchor + generic memory", "anchor alone"):
        assert f"held-out ppl, {row}" in evaluated["stderr"], evaluated["stderr"][-2000:]
        assert f"probes, {row}" in evaluated["stderr"], evaluated["stderr"][-2000:]


def test_eval_writes_valid_figures_beside_its_results(evaluated):
    out = evaluated["out"]
    paths = [out.parent / f"results_{name}.png" for name in FIGURES]
    for path in paths:
        assert_png(path)
    assert "figures: " + ", ".join(map(str, paths)) in evaluated["stdout"]


def test_eval_is_a_child_run_of_training_with_the_results_values(evaluated):
    client = MlflowClient(tracking_uri=evaluated["tracking"])
    training_run = json.loads((evaluated["work"] / "memory" / "mlflow_run.json").read_text())["run_id"]
    experiment = client.get_run(training_run).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{training_run}'")
    assert len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED"
    assert f"eval logged as run {child.info.run_id}" in evaluated["stdout"]

    results = evaluated["results"]
    expected = expected_metrics(results)
    assert len(expected) == 3 * (1 + 2 + 6) + 2  # rows x (ppl, 2 subtrees, 5 buckets + all) + 2 levels
    assert "eval/anchor/probe_acc/16plus" in expected and "eval/memory/ppl/subtree_1" in expected
    assert child.data.metrics == pytest.approx(expected, rel=1e-12)
    for key in expected:
        assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [results["step"]]

    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"results.json", "results.md", "figures"} <= artifacts
    figures = {a.path: a.file_size for a in client.list_artifacts(child.info.run_id, "figures")}
    assert set(figures) == {f"figures/results_{name}.png" for name in FIGURES}
    local = Path(client.download_artifacts(child.info.run_id, "figures", str(evaluated["work"] / "downloaded")))
    for name in FIGURES:
        assert_png(local / f"results_{name}.png")
    logged = json.loads(Path(client.download_artifacts(child.info.run_id, "results.json",
                                                       str(evaluated["work"] / "downloaded"))).read_text())
    assert logged == results
    # the training run is left as training wrote it
    assert client.get_run(training_run).info.status == "FINISHED"
    assert not any(key.startswith("eval/") for key in client.get_run(training_run).data.metrics)
