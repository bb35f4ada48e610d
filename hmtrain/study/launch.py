"""How a study trains one run (an arm x seed's memory run, or a dense baseline): `hmtrain study --launch`.

- `local` (default): in this process, one run after another (train's `train`).
- `torchrun`: one run after another, each on `--nproc` ranks of this machine: `python -m
  hmtrain.parallel.launch` (torchrun) of `hmtrain train --config <run_dir>.yaml`, the run's whole config
  written beside its run directory. The study waits for each; its output streams to the console.
- `slurm`: every run is submitted at once (`sbatch launch/slurm.sbatch train --config ...`, `--nodes`
  nodes of `--nproc` ranks), then the study waits for each in turn and evaluates it. The job ids are kept
  in `<run_dir>.slurm.json`, so a study stopped while its jobs run picks them up again when rerun
  instead of submitting twice; a run that left the queue unfinished is submitted again (and resumes from
  its last checkpoint, as slurm.sbatch always does).

A run is finished when its newest checkpoint is at its last step: that is how the study tells, for the
launchers, a run that ended from one that stopped early (the job's own log says why).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hmtrain.config import Config, to_yaml
from hmtrain.train.trainer import train
from hmtrain.util.files import write_text

LAUNCHES = ("local", "torchrun", "slurm")
REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPT = REPO / "launch" / "slurm.sbatch"
POLL_S = 2.0  # squeue is cheap; a run takes minutes


class LaunchError(RuntimeError):
    """A run the launcher started did not finish: which run, and where its log is. It exits as the run did
    (2 for bad input), with its own words: the run's output already said what went wrong."""

    def __init__(self, message: str, returncode: int = 1):
        super().__init__(message)
        self.input_error = returncode == 2
        self.environment = True


@dataclass
class LaunchOptions:
    launch: str = "local"
    nproc: int = 1  # ranks per run (torchrun), or per node (slurm)
    nodes: int = 1  # slurm only

    def __post_init__(self) -> None:
        if self.launch not in LAUNCHES:
            raise ValueError(f"--launch {self.launch!r}: one of {', '.join(LAUNCHES)}")
        if self.nproc < 1 or self.nodes < 1:
            raise ValueError(f"--nproc {self.nproc} / --nodes {self.nodes}: each must be at least 1")
        if self.launch == "local" and (self.nproc, self.nodes) != (1, 1):
            raise ValueError("--nproc and --nodes need --launch torchrun or slurm (--launch local trains in this "
                             "process)")
        if self.launch == "torchrun" and self.nodes != 1:
            raise ValueError("--nodes needs --launch slurm (--launch torchrun runs on this machine)")


def finished_checkpoint(cfg: Config) -> Optional[Path]:
    """The run's newest checkpoint if it is at the run's last step, else None."""
    checkpoints = Path(cfg.train.run_dir) / "checkpoints"
    try:
        latest = checkpoints / (checkpoints / "latest").read_text().strip()
        step = json.loads((latest / "trainer.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None
    return latest if step == cfg.train.pretrain_steps + cfg.train.memory_steps else None


def config_file(cfg: Config) -> Path:
    """The run's whole config, written beside its run directory for a launcher to read."""
    path = Path(cfg.train.run_dir).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, to_yaml(cfg))
    return path


def train_args(cfg: Config) -> list[str]:
    return ["train", "--config", str(config_file(cfg)), f"train.run_dir={cfg.train.run_dir}"]


class Launcher:
    """`start(cfg)` begins a run (or finds it running); `wait(cfg)` returns its final checkpoint."""

    def __init__(self, options: LaunchOptions):
        self.options = options

    @property
    def concurrent(self) -> bool:
        """Runs are started all at once, then waited for (slurm), rather than run one by one."""
        return self.options.launch == "slurm"

    def start(self, cfg: Config) -> None:
        if self.options.launch == "slurm":
            self._submit(cfg)

    def wait(self, cfg: Config) -> Path:
        if self.options.launch == "local":
            return _train_here(cfg)
        if self.options.launch == "torchrun":
            return self._torchrun(cfg)
        return self._wait_slurm(cfg)

    # -- torchrun ------------------------------------------------------------------------------

    def _torchrun(self, cfg: Config) -> Path:
        resume = ["--resume"] if (Path(cfg.train.run_dir) / "config.yaml").is_file() else []
        cmd = [sys.executable, "-m", "hmtrain.parallel.launch", "--standalone", "--nnodes", "1", "--nproc_per_node",
               str(self.options.nproc), "--max_restarts", "0", "-m", "hmtrain.cli", *train_args(cfg), *resume]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        rc = subprocess.run(cmd, env=env).returncode
        checkpoint = finished_checkpoint(cfg)
        if rc != 0 or checkpoint is None:
            raise LaunchError(f"{cfg.logging.run_name}: `{' '.join(cmd[2:])}` ended with exit code {rc}"
                              f"{'' if checkpoint else ' and no checkpoint at its last step'} (its output is above)",
                              returncode=rc)
        return checkpoint

    # -- slurm ---------------------------------------------------------------------------------

    def _record(self, cfg: Config) -> Path:
        return Path(cfg.train.run_dir).with_suffix(".slurm.json")

    def _submit(self, cfg: Config) -> None:
        if finished_checkpoint(cfg) is not None or _in_queue(self._job_id(cfg)):
            return
        log = Path(cfg.train.run_dir).with_suffix(".slurm.out")
        cmd = ["sbatch", "--parsable", f"--nodes={self.options.nodes}", f"--output={log}", f"--chdir={REPO}",
               f"--job-name=hmtrain-{Path(cfg.train.run_dir).parent.name}", str(SLURM_SCRIPT), *train_args(cfg)]
        env = {**os.environ, "HMTRAIN_NPROC_PER_NODE": str(self.options.nproc), "HMTRAIN_PYTHON": sys.executable}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LaunchError(f"{cfg.logging.run_name}: sbatch failed ({proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()}")
        job_id = proc.stdout.strip().split(";")[0]
        write_text(self._record(cfg), json.dumps({"job_id": job_id, "log": str(log)}) + "\n")
        print(f"submitted {cfg.logging.run_name}: SLURM job {job_id} (log {log})", flush=True)

    def _job_id(self, cfg: Config) -> Optional[str]:
        try:
            return json.loads(self._record(cfg).read_text())["job_id"]
        except (OSError, ValueError, KeyError):
            return None

    def _wait_slurm(self, cfg: Config) -> Path:
        self._submit(cfg)  # a run the first pass did not start (one that a rerun finds unfinished)
        job_id = self._job_id(cfg)
        while _in_queue(job_id):
            time.sleep(POLL_S)
        checkpoint = finished_checkpoint(cfg)
        if checkpoint is None:
            log = Path(cfg.train.run_dir).with_suffix(".slurm.out")
            raise LaunchError(f"{cfg.logging.run_name}: SLURM job {job_id} left the queue without finishing the run "
                              f"(its log: {log}); rerun the study to submit it again")
        return checkpoint


def _in_queue(job_id: Optional[str]) -> bool:
    """The job is pending, running or being requeued (squeue lists it)."""
    if job_id is None:
        return False
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _train_here(cfg: Config) -> Path:
    return train(cfg, resume=(Path(cfg.train.run_dir) / "config.yaml").is_file())
