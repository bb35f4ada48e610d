"""What the launcher tests start, and how: `hmtrain train` on a tiny prepared corpus, through
launch/torchrun.sh and launch/slurm.sbatch.

The training command comes from one place, the `job` fixture. The checks read what the trainer writes:
exit codes, metrics.jsonl (one row per step, cut back to the checkpoint's step on resume) and
checkpoints/ (step_*/trainer.json, one DCP shard `__<rank>_0.distcp` per rank, `latest`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SLURM_SBATCH = REPO / "launch" / "slurm.sbatch"


@dataclass
class Job:
    base: list[str]  # `train --config ...` and the overrides every run shares
    long_steps: int  # a run that a test interrupts after its second step: it must still train seconds later

    def args(self, run_dir: Path, steps: int, checkpoint_every: int = 1000) -> list[str]:
        """`hmtrain train` arguments for `steps` steps (one anchor step, the rest with memory)."""
        return [*self.base, f"train.run_dir={run_dir}", "train.pretrain_steps=1", f"train.memory_steps={steps - 1}",
                f"train.checkpoint_every={checkpoint_every}"]


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> list[str]:
    """A tiny prepared corpus (the e2e tests' micro model) and the overrides that point at it."""
    from tests.e2e.conftest import MICRO, run_cli

    root = tmp_path_factory.mktemp("launch")
    run_cli("data", "synth", "--out", str(root / "corpus"), "--people", "40", "--documents", "200", cwd=root)
    overrides = [*MICRO, f"data.documents={root / 'corpus' / 'documents.jsonl.gz'}",
                 f"data.prepared={root / 'prepared'}"]
    run_cli("data", "prepare", "--config", "tiny", *overrides, cwd=root)
    return overrides


@pytest.fixture
def job(prepared_data) -> Job:
    # 2 sequences per rank and step on 2 ranks; ~0.1 s a step on 2 busy cores, so 60 steps outlast a signal
    return Job(base=["train", "--config", "tiny", *prepared_data, "train.global_batch_size=4",
                     "train.micro_batch_size=2", "train.log_every=1", "logging.mlflow=false", "train.progress=false",
                     "parallel.timeout_s=30"],
               long_steps=60)


def launch_env(marker: str = "") -> dict[str, str]:
    """The environment of a launched job; `marker` tags its processes so a test can find them all."""
    return {**os.environ, "PYTHON": sys.executable, "HMTRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "HMTRAIN_LOG_LEVEL": "WARNING", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HMTRAIN_TEST_MARK": marker}


def new_marker() -> str:
    return uuid.uuid4().hex


def processes_marked(marker: str) -> list[int]:
    """Live processes whose environment carries HMTRAIN_TEST_MARK=marker."""
    needle = f"HMTRAIN_TEST_MARK={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = metrics_steps(run_dir)
        if steps and steps[-1] >= step:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended ({proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run_dir / 'metrics.jsonl'} after {timeout}s")


def latest_checkpoint(run_dir: Path) -> Path:
    pointer = run_dir / "checkpoints" / "latest"
    assert pointer.is_file(), f"no checkpoint in {run_dir}"
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    assert (path / "trainer.json").is_file(), f"{path} is not a complete checkpoint"
    return path


def assert_checkpoint(run_dir: Path, step: int, world: int) -> None:
    """`latest` is complete, at `step`, with a DCP shard written by each of `world` ranks."""
    path = latest_checkpoint(run_dir)
    assert json.loads((path / "trainer.json").read_text())["step"] == step, path
    shards = sorted(p.name for p in path.glob("__*_0.distcp"))
    assert shards == [f"__{rank}_0.distcp" for rank in range(world)], f"{path}: {shards}"


# --- SLURM -----------------------------------------------------------------------------------------------

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def slurm_unavailable() -> str | None:
    """Why no SLURM cluster can run a job here, or None when one answers with a usable node."""
    missing = [tool for tool in ("sinfo", "sbatch", "scontrol", "scancel") if shutil.which(tool) is None]
    if missing:
        return (f"no SLURM client tools ({', '.join(missing)} not on PATH); "
                "CI starts a cluster with launch/ci/start_slurm.sh")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if proc.returncode != 0:
        return f"no SLURM controller answers (sinfo: {proc.stderr.strip()[:300]})"
    states = proc.stdout.split()
    if not any(s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no SLURM node up (sinfo node states: {' '.join(states) or 'none'})"
    return None


@pytest.fixture(scope="session")
def slurm() -> None:
    """Skip (or, in CI, fail) where no cluster answers; session-scoped so that it is decided once (sinfo takes
    ~10 s to give up on a controller that is down) and before the session's data is prepared."""
    reason = slurm_unavailable()
    if reason is not None:
        if os.environ.get("HMTRAIN_REQUIRE_SLURM") == "1":  # set by .ci/run once its cluster is up
            pytest.fail(f"HMTRAIN_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def sbatch(args: list[str], cwd: Path, output: Path, nproc: int = 2) -> str:
    env = {**launch_env(), "HMTRAIN_NPROC_PER_NODE": str(nproc)}
    proc = subprocess.run(["sbatch", "--parsable", "--export=ALL", f"--chdir={cwd}", f"--output={output}",
                           str(SLURM_SBATCH), *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_record(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def wait_job(job_id: str, output: Path, timeout: float = 300) -> dict[str, str]:
    """Poll until the job ends (a requeued one starts again after SLURM's credential lifetime + 1 s:
    11 s on the CI cluster, 121 s by default)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = job_record(job_id)
        if record["JobState"] in TERMINAL:
            return record
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], timeout=30)
    log = output.read_text()[-6000:] if output.exists() else "(no output)"
    raise AssertionError(f"SLURM job {job_id} still {record['JobState']} after {timeout}s:\n{log}")


def exit_code(record: dict[str, str]) -> int:
    code, signal = record["ExitCode"].split(":")
    return int(code) if int(signal) == 0 else 128 + int(signal)
