"""hmtrain.parallel.launch: which failed rank is the root cause, and the job's exit code from it."""
import signal

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from hmtrain.parallel.launch import STOPPED, describe, exit_code, root_cause


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
