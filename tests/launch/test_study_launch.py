"""`hmtrain study --launch torchrun|slurm`: a study hands each run to a launcher and evaluates it here. Under
torchrun, a memory run and its dense baseline train on 2 ranks (one DCP shard per rank in their checkpoints);
under SLURM, both are submitted before the first is evaluated, and a rerun neither trains nor submits again."""
import json
import subprocess
import sys

import pytest

from hmtrain.cli import main
from tests.e2e.test_study import write_spec
from tests.launch.conftest import assert_checkpoint, launch_env

pytestmark = pytest.mark.multiprocess
ONE_ARM = "  - {name: ffn, overrides: [memory.kind=ffn]}"
TWO_RANKS = ["train.micro_batch_size=2", "parallel.timeout_s=60"]  # 4 sequences a step: 2 per rank


def study(spec, out, *launch: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmtrain.cli", "study", "--spec", str(spec), "--out", str(out),
                           *launch], cwd=cwd, env={**launch_env(), "COLUMNS": "300"}, capture_output=True, text=True,
                          timeout=900)


def assert_runs(out, world: int) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == ["ffn"]
    assert summary["arms"]["ffn"]["summary"]["rows"][-1]["name"] == "dense baseline"
    assert_checkpoint(out / "runs" / "ffn" / "seed0" / "memory", step=4, world=world)
    (dense,) = out.glob("dense/*/seed0")
    assert_checkpoint(dense, step=4, world=world)


def test_a_study_trains_each_run_under_torchrun(tmp_path, capsys, monkeypatch):
    spec, out = tmp_path / "one.yaml", tmp_path / "study"
    write_spec(spec, ONE_ARM, seeds="[0]", extra="eval: {dense_baseline: true}\n", base=tuple(TWO_RANKS))
    proc = study(spec, out, "--launch", "torchrun", "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_runs(out, world=2)
    assert (out / "runs" / "ffn" / "seed0" / "memory.yaml").is_file()  # the config the launcher was given

    monkeypatch.setenv("COLUMNS", "300")
    capsys.readouterr()
    assert main(["study", "--spec", str(spec), "--out", str(out), "--launch", "torchrun", "--nproc", "2"]) == 0
    assert capsys.readouterr().out.count("skipped: ") == 1


def test_a_study_submits_every_run_to_slurm_then_evaluates_them(slurm, tmp_path):
    spec, out = tmp_path / "one.yaml", tmp_path / "study"
    write_spec(spec, ONE_ARM, seeds="[0]", extra="eval: {dense_baseline: true}\n", base=tuple(TWO_RANKS))
    # one rank per job: the torchrun test above covers two, and the CI node runs one job at a time
    proc = study(spec, out, "--launch", "slurm", "--nproc", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_runs(out, world=1)
    lines = proc.stdout.splitlines()
    submitted = [i for i, line in enumerate(lines) if line.startswith("submitted ")]
    first_eval = next(i for i, line in enumerate(lines) if "perplexity" in line)
    assert len(submitted) == 2 and max(submitted) < first_eval  # both runs queued before either is evaluated
    records = [json.loads(p.read_text()) for p in out.rglob("*.slurm.json")]
    assert len(records) == 2 and all("job_id" in r for r in records)

    again = study(spec, out, "--launch", "slurm", "--nproc", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted " not in again.stdout and again.stdout.count("skipped: ") == 1


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2"], "--nproc and --nodes need --launch torchrun or slurm"),
    (["--launch", "torchrun", "--nodes", "2"], "--nodes needs --launch slurm"),
    (["--launch", "torchrun", "--nproc", "0"], "--nproc 0 / --nodes 1: each must be at least 1"),
])
def test_bad_launch_options_exit_2_naming_them(tmp_path, capsys, args, message):
    spec = tmp_path / "one.yaml"
    write_spec(spec, ONE_ARM, seeds="[0]")
    assert main(["study", "--spec", str(spec), "--out", str(tmp_path / "study"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study").exists()

