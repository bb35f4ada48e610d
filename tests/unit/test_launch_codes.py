"""hmtrain.parallel.launch: which failed rank is the root cause, and the job's exit code from it."""
import signal

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from hmtrain.parallel.launch import STOPPED, describe, exit_code, reported_lines, root_cause
from hmtrain.parallel.supervisor import LAUNCHED, report_to_launcher


def failure(exitcode: int, timestamp: int) -> ProcessFailure:
    found = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="/nonexistent")
    found.timestamp = timestamp
    return found


def test_a_rank_stopped_by_torchrun_is_not_the_root_cause_even_when_recorded_first():
    # rank 0 was stopped by torchrun's SIGTERM (and recorded first); rank 1 was SIGKILLed: rank 1 is the cause
    failures = {0: failure(-signal.SIGTERM, 10), 1: failure(-signal.SIGKILL, 11)}
    assert root_cause(failures)[0] == 1
    assert exit_code(root_cause(failures)[1].exitcode) == 128 + signal.SIGKILL
    # a rank that caught the SIGTERM, checkpointed and left with 143 is a stopped rank too
    failures = {0: failure(STOPPED, 10), 1: failure(2, 12)}
    assert root_cause(failures)[0] == 1 and exit_code(2) == 2


def test_every_rank_stopped_by_sigterm_is_a_stopped_job():
    failures = {1: failure(STOPPED, 10), 0: failure(STOPPED, 10)}
    assert root_cause(failures)[0] == 0 and exit_code(root_cause(failures)[1].exitcode) == 143


def test_a_rank_killed_by_a_signal_outranks_a_peer_that_failed_because_it_died():
    # rank 1 SIGKILLed (recorded late: no error file); rank 0 left with an error when its peer vanished
    assert root_cause({0: failure(1, 10), 1: failure(-signal.SIGKILL, 12)})[0] == 1


def test_of_two_real_failures_the_earlier_is_the_cause():
    assert root_cause({0: failure(1, 20), 1: failure(1, 19)})[0] == 1


def test_exits_read_as_the_shell_writes_them():
    assert exit_code(-9) == 137 and exit_code(-15) == 143 and exit_code(1) == 1 and exit_code(0) == 0
    assert describe(-9) == "killed by SIGKILL" and describe(2) == "exit code 2"


def reported(tmp_path, rank: int, exitcode: int, who: str, text: str, monkeypatch) -> ProcessFailure:
    """A failure whose rank handed its line over as a rank of the launcher does."""
    path = tmp_path / f"error{rank}.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.setenv(LAUNCHED, "1")
    assert report_to_launcher(who, text)
    return ProcessFailure(local_rank=rank, pid=1, exitcode=exitcode, error_file=str(path))


def test_the_launcher_prints_each_different_error_once_with_its_ranks(tmp_path, monkeypatch):
    same = "error: config key 'train.seed': must be >= 0"
    failures = {rank: reported(tmp_path, rank, 2, "hmtrain train", same, monkeypatch) for rank in range(4)}
    failures[4] = reported(tmp_path, 4, 2, "hmtrain train", "error: data.prepared: no manifest.json", monkeypatch)
    failures[5] = failure(-signal.SIGTERM, 30)  # stopped by torchrun before it could say anything
    assert reported_lines(4, failures) == ["hmtrain train (rank 4): error: data.prepared: no manifest.json",
                                           f"hmtrain train (ranks 0, 1, 2, 3): {same}"]


def test_outside_the_launcher_a_rank_prints_its_own_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.delenv(LAUNCHED, raising=False)  # plain torchrun
    assert not report_to_launcher("hmtrain train", "error: x") and not (tmp_path / "error.json").exists()
