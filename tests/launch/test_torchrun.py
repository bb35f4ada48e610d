"""launch/torchrun.sh: argument errors, a 2-rank job, a signal to the launcher (the ranks checkpoint; the job
resumes), a dead rank and a job past --timeout; none may leave a process behind."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.conftest import (
    TORCHRUN_SH,
    assert_checkpoint,
    environ_of,
    launch_env,
    metrics_steps,
    new_marker,
    processes_marked,
    wait_for_step,
)


@pytest.mark.parametrize("args, message", [
    ([], "--nproc is required"),
    (["--nproc"], "--nproc needs a value"),
    (["--nproc", "0", "--", "train"], "--nproc must be a positive integer, got '0'"),
    (["--nproc", "two", "--", "train"], "--nproc must be a positive integer, got 'two'"),
    (["--nproc", "2", "--timeout", "1h", "--", "train"], "--timeout must be a positive integer, got '1h'"),
    (["--nproc", "2", "--grace=-5", "--", "train"], "--grace must be a positive integer, got '-5'"),
    (["--nproc", "2"], "no hmtrain command after '--'"),
    (["--nproc", "2", "--"], "no hmtrain command after '--'"),
    (["--nproc", "2", "train", "--config", "tiny"], "unknown option 'train' (hmtrain's own arguments go after '--')"),
    (["--nprocs", "2", "--", "train"], "unknown option '--nprocs'"),
])
def test_bad_arguments_stop_before_any_job_with_a_clear_error(args, message, tmp_path):
    proc = subprocess.run([str(TORCHRUN_SH), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"launch/torchrun.sh: error: {message}" in proc.stderr
    assert "usage: launch/torchrun.sh --nproc N" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_python_without_torch_is_named(tmp_path):
    env = {**os.environ, "PYTHON": "/bin/true-not-a-python"}
    proc = subprocess.run([str(TORCHRUN_SH), "--nproc", "2", "--", "train"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "PYTHON=/bin/true-not-a-python not found" in proc.stderr


def launch(tmp_path, args, *launcher_args, check=None, timeout=300, nproc=2):
    """Run the launcher to its end; no process of its job may outlive it."""
    marker, left = new_marker(), []
    try:
        proc = subprocess.run([str(TORCHRUN_SH), "--nproc", str(nproc), *launcher_args, "--", *args], cwd=tmp_path,
                              env=launch_env(marker), capture_output=True, text=True, timeout=timeout)
    finally:
        left = processes_marked(marker)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} outlived the launcher"
    if check is not None:
        assert proc.returncode == check, f"rc {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def start(tmp_path, args, *launcher_args, marker) -> subprocess.Popen:
    log = (tmp_path / f"{marker}.log").open("w")
    return subprocess.Popen([str(TORCHRUN_SH), "--nproc", "2", *launcher_args, "--", *args], cwd=tmp_path,
                            env=launch_env(marker), stdout=log, stderr=subprocess.STDOUT)


def end(proc: subprocess.Popen, marker: str) -> None:
    """Kill whatever a failed test left running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in processes_marked(marker):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.multiprocess
def test_two_ranks_train_and_checkpoint(job, tmp_path):
    run_dir = tmp_path / "run"
    launch(tmp_path, job.args(run_dir, steps=4, checkpoint_every=2), check=0)
    assert metrics_steps(run_dir) == [1, 2, 3, 4]
    assert_checkpoint(run_dir, step=4, world=2)


@pytest.mark.multiprocess
def test_sigterm_to_the_launcher_checkpoints_and_the_job_resumes(job, tmp_path):
    run_dir, marker = tmp_path / "run", new_marker()
    proc = start(tmp_path, job.args(run_dir, steps=job.long_steps), marker=marker)
    try:
        wait_for_step(run_dir, 2, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / f"{marker}.log").read_text()[-4000:]
        assert processes_marked(marker) == []
    finally:
        end(proc, marker)
    stopped_at = metrics_steps(run_dir)[-1]
    assert 2 <= stopped_at < job.long_steps
    assert_checkpoint(run_dir, step=stopped_at, world=2)
    launch(tmp_path, [*job.args(run_dir, steps=job.long_steps), "--resume"], check=0)
    assert metrics_steps(run_dir) == list(range(1, job.long_steps + 1))


def _supervisor(marker: str, name: str) -> int:
    """The pid of the job's `timeout` wrapper or of torchrun (the marked processes without a LOCAL_RANK)."""
    found = []
    for pid in processes_marked(marker):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if "LOCAL_RANK" in environ_of(pid):
            continue
        program = Path(cmdline[0].decode()).name
        if (name == "timeout" and program == "timeout") or (
                name == "torchrun" and program != "timeout" and b"hmtrain.parallel.launch" in cmdline):
            found.append(pid)
    assert len(found) == 1, (name, found)
    return found[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("victim", ["torchrun", "timeout"])
def test_ranks_stop_and_checkpoint_when_their_supervisor_is_killed(job, tmp_path, victim):
    run_dir, marker = tmp_path / "run", new_marker()
    proc = start(tmp_path, job.args(run_dir, steps=job.long_steps), marker=marker)
    try:
        wait_for_step(run_dir, 2, proc)
        os.kill(_supervisor(marker, victim), signal.SIGKILL)
        rc = proc.wait(timeout=120)
        log = (tmp_path / f"{marker}.log").read_text()
        assert processes_marked(marker) == [], f"ranks outlived the launcher:\n{log[-4000:]}"
        assert rc != 0, log[-4000:]
    finally:
        end(proc, marker)
    stopped_at = metrics_steps(run_dir)[-1]
    assert stopped_at < job.long_steps  # the ranks stopped, instead of training on to the end
    assert_checkpoint(run_dir, step=stopped_at, world=2)  # and checkpointed first (SIGTERM, not SIGKILL)


@pytest.mark.multiprocess
def test_a_dead_rank_ends_the_whole_job_within_a_minute(job, tmp_path):
    run_dir, marker = tmp_path / "run", new_marker()
    proc = start(tmp_path, job.args(run_dir, steps=job.long_steps), "--grace", "30", marker=marker)
    try:
        wait_for_step(run_dir, 2, proc)
        workers = {pid: environ_of(pid).get("LOCAL_RANK") for pid in processes_marked(marker)}
        victim = [pid for pid, local_rank in workers.items() if local_rank == "1"]
        assert len(victim) == 1, workers
        os.kill(victim[0], signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job outlived its dead rank by a minute:\n{(tmp_path / f'{marker}.log').read_text()}")
        log = (tmp_path / f"{marker}.log").read_text()
        assert rc == 128 + signal.SIGKILL, log[-4000:]  # the dead rank's own death, not torchrun's 1
        assert "torchrun: rank 1 ended the job (killed by SIGKILL)" in log, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        assert processes_marked(marker) == [], "a rank outlived the job"
        print(f"job ended {time.monotonic() - killed_at:.1f}s after rank 1 was killed")
    finally:
        end(proc, marker)
    assert metrics_steps(run_dir)[-1] < job.long_steps


@pytest.mark.multiprocess
def test_a_job_past_its_timeout_is_stopped(job, tmp_path):
    proc = launch(tmp_path, job.args(tmp_path / "run", steps=10_000), "--timeout", "3", "--grace", "5",
                  timeout=60)
    assert proc.returncode == 124, proc.stderr[-4000:]
    assert "launch/torchrun.sh: the job ran past --timeout 3s and was stopped" in proc.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("target", ["torchrun", "rank"])
def test_sigterm_to_torchrun_or_one_rank_stops_the_job_with_143_and_no_traceback(job, tmp_path, target):
    run_dir, marker = tmp_path / "run", new_marker()
    proc = start(tmp_path, job.args(run_dir, steps=job.long_steps), marker=marker)
    try:
        wait_for_step(run_dir, 2, proc)
        if target == "torchrun":
            victim = _supervisor(marker, "torchrun")
        else:
            victim = next(pid for pid in processes_marked(marker) if environ_of(pid).get("LOCAL_RANK") == "1")
        os.kill(victim, signal.SIGTERM)
        rc = proc.wait(timeout=120)
        log = (tmp_path / f"{marker}.log").read_text()
        assert rc == 128 + signal.SIGTERM, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
    finally:
        end(proc, marker)
    stopped_at = metrics_steps(run_dir)[-1]
    assert stopped_at < job.long_steps
    assert_checkpoint(run_dir, step=stopped_at, world=2)


@pytest.mark.multiprocess
def test_a_bad_config_under_the_launcher_is_one_error_line_and_exit_2(job, tmp_path):
    proc = launch(tmp_path, [*job.args(tmp_path / "run", steps=3), "train.no_such_key=1"])
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    # every rank fails alike: the launcher prints the line once, whichever rank it came from
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "unknown key 'train.no_such_key'" in errors[0], proc.stderr[-4000:]
    assert re.search(r"torchrun: rank [01] ended the job \(exit code 2\)", proc.stderr), proc.stderr[-4000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc, overrides, words", [
    (2, ["train.global_batch_size=6"], "config key 'train.global_batch_size': a global batch of 6 sequences does "
                                       "not split into micro-batches of 2 per rank on 2 ranks"),
])
def test_what_the_world_size_decides_is_checked_before_anything_is_written(job, tmp_path, nproc, overrides, words):
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, [*job.args(run_dir, steps=3), *overrides], nproc=nproc)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert words in errors[0], errors
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
