"""tests/cores.py: under xdist, one-process tests share the cores, one multi-process test runs at a time, and a
launcher test runs alone."""
import threading

import pytest

from tests.cores import machine

WAIT_S = 0.5  # how long a holder that should be kept out is given to get in anyway


def enters(directory, kind: str) -> threading.Event:
    """Start a thread that takes the machine and then sets the returned event (and keeps it till released)."""
    inside, release = threading.Event(), threading.Event()

    def hold():
        with machine(directory, kind):
            inside.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    inside.release = release
    return inside


def test_shared_holders_run_together_and_an_exclusive_one_waits_for_them(tmp_path):
    first = enters(tmp_path, "one")
    assert first.wait(5)
    second = enters(tmp_path, "one")
    assert second.wait(5)  # two ordinary tests at once
    alone = enters(tmp_path, "alone")
    assert not alone.wait(WAIT_S)
    first.release.set()
    assert not alone.wait(WAIT_S)  # one shared holder is still inside
    second.release.set()
    assert alone.wait(5)
    alone.release.set()


def test_a_waiting_exclusive_holder_keeps_new_shared_ones_out(tmp_path):
    reader = enters(tmp_path, "one")
    assert reader.wait(5)
    writer = enters(tmp_path, "alone")
    assert not writer.wait(WAIT_S)
    late = enters(tmp_path, "one")
    assert not late.wait(WAIT_S)  # it queues behind the writer rather than starving it
    reader.release.set()
    assert writer.wait(5)
    assert not late.wait(WAIT_S)  # the writer runs alone
    writer.release.set()
    assert late.wait(5)
    late.release.set()


def test_one_multi_process_test_at_a_time_beside_one_process_tests(tmp_path):
    single = enters(tmp_path, "one")
    assert single.wait(5)
    ranks = enters(tmp_path, "several")
    assert ranks.wait(5)  # beside a one-process test
    more = enters(tmp_path, "several")
    assert not more.wait(WAIT_S)  # but not beside another multi-process one
    other = enters(tmp_path, "one")
    assert other.wait(5)  # the waiting one holds no share of the cores
    ranks.release.set()
    assert more.wait(5)
    alone = enters(tmp_path, "alone")
    assert not alone.wait(WAIT_S)
    for holder in (single, other, more):
        holder.release.set()
    assert alone.wait(5)
    alone.release.set()


def test_outside_xdist_nothing_is_locked_and_a_bad_kind_is_refused(tmp_path):
    with machine(None, "alone"), machine(None, "alone"):
        pass
    with pytest.raises(ValueError, match="kind must be one of"):
        with machine(tmp_path, "two"):
            pass


def test_launcher_tests_run_alone_and_multiprocess_ones_one_at_a_time():
    from tests.conftest import LAUNCH, kind_of

    class Item:
        def __init__(self, path, multiprocess):
            self.path, self.multiprocess = path, multiprocess

        def get_closest_marker(self, name):
            return object() if name == "multiprocess" and self.multiprocess else None

    tests = LAUNCH.parent
    assert kind_of(Item(LAUNCH / "test_torchrun.py", True)) == "alone"
    assert kind_of(Item(LAUNCH / "test_cluster_options.py", False)) == "alone"
    assert kind_of(Item(tests / "dist" / "test_train_distributed.py", True)) == "several"
    assert kind_of(Item(tests / "e2e" / "test_cli.py", False)) == "one"
