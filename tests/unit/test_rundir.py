"""The run-directory lock: a live holder stops a second `train`; a killed one does not."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from hmtrain.train.rundir import LOCK_FILE, RunDirLocked, lock_run_dir, make_run_dir


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        with pytest.raises(RunDirLocked) as exc_info:
            lock_run_dir(run_dir)
        message = str(exc_info.value)
        assert str(run_dir) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert lock_run_dir(run_dir, rank=1).path.parent == run_dir  # other ranks never contend
    with lock_run_dir(run_dir):  # released
        pass


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hmtrain.train.rundir import lock_run_dir; "
                               f"lock = lock_run_dir({str(run_dir)!r}); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            lock_run_dir(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / LOCK_FILE).exists()  # the stale file stays; the kernel dropped the lock
    with lock_run_dir(run_dir):
        pass


def test_run_dir_under_a_regular_file_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a directory") as exc_info:
        make_run_dir(tmp_path / "file" / "run")
    assert str(tmp_path / "file") in str(exc_info.value)


def test_a_run_that_wrote_nothing_leaves_its_directory_as_it_found_it(tmp_path):
    empty, new, used = tmp_path / "empty", tmp_path / "new", tmp_path / "used"
    empty.mkdir()
    with lock_run_dir(empty):
        assert (empty / LOCK_FILE).exists()
    assert list(empty.iterdir()) == []
    with lock_run_dir(new):
        pass
    assert not new.exists()  # made for the run, removed with it
    with lock_run_dir(used):
        (used / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in used.iterdir()) == ["metrics.jsonl", LOCK_FILE]  # a run that wrote keeps it
