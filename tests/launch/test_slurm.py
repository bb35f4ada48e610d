"""launch/slurm.sbatch on a real SLURM cluster (CI starts one with launch/ci/start_slurm.sh): a 2-rank job
checkpoints, a resubmitted job resumes by itself, and the time-limit warning checkpoints, requeues the job
and the requeued run finishes it. Skipped, with the reason, where no cluster answers."""
import subprocess

import pytest

from tests.launch.conftest import assert_checkpoint, exit_code, metrics_steps, sbatch, wait_for_step, wait_job

pytestmark = pytest.mark.multiprocess  # every test asks for `slurm` first: it skips before any data is prepared


def test_a_job_without_a_run_dir_is_refused(slurm, tmp_path):
    output = tmp_path / "job.out"
    record = wait_job(sbatch(["train", "--config", "tiny"], tmp_path, output), output)
    assert (record["JobState"], exit_code(record)) == ("FAILED", 2)
    assert "slurm.sbatch: error: pass train.run_dir=DIR on the command line" in output.read_text()


def test_two_ranks_train_then_a_resubmitted_job_resumes(slurm, job, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    record = wait_job(sbatch(job.args(run_dir, steps=4, checkpoint_every=2), tmp_path, output), output)
    assert (record["JobState"], exit_code(record)) == ("COMPLETED", 0), output.read_text()[-6000:]
    assert "1 node(s) x 2 ranks" in output.read_text()
    assert metrics_steps(run_dir) == [1, 2, 3, 4]
    assert_checkpoint(run_dir, step=4, world=2)

    record = wait_job(sbatch(job.args(run_dir, steps=6), tmp_path, output), output)  # no --resume given
    assert (record["JobState"], exit_code(record)) == ("COMPLETED", 0), output.read_text()[-6000:]
    assert f"{run_dir} has a checkpoint: resuming from it" in output.read_text()
    assert metrics_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert_checkpoint(run_dir, step=6, world=2)


def test_the_time_limit_warning_checkpoints_requeues_and_the_job_finishes(slurm, job, tmp_path):
    run_dir, output = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch(job.args(run_dir, steps=job.long_steps), tmp_path, output)
    wait_for_step(run_dir, 2)
    # what SLURM sends 120 s before the time limit (#SBATCH --signal=B:USR1@120)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    record = wait_job(job_id, output)
    log = output.read_text()
    assert (record["JobState"], exit_code(record), record["Restarts"]) == ("COMPLETED", 0, "1"), log[-6000:]
    assert f"requeueing job {job_id}" in log and f"{run_dir} has a checkpoint: resuming from it" in log, log[-6000:]
    assert metrics_steps(run_dir) == list(range(1, job.long_steps + 1)), f"steps lost or repeated:\n{log[-6000:]}"
    assert_checkpoint(run_dir, step=job.long_steps, world=2)
