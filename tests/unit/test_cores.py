"""tests/cores.py: under xdist, tests share the machine and a multi-process test holds it alone."""
import threading

from tests.cores import machine

WAIT_S = 0.5  # how long a holder that should be kept out is given to get in anyway


def enters(directory, exclusive: bool) -> threading.Event:
    """Start a thread that takes the machine and then sets the returned event (and keeps it till released)."""
    inside, release = threading.Event(), threading.Event()

    def hold():
        with machine(directory, exclusive):
            inside.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    inside.release = release
    return inside


def test_shared_holders_run_together_and_an_exclusive_one_waits_for_them(tmp_path):
    first = enters(tmp_path, exclusive=False)
    assert first.wait(5)
    second = enters(tmp_path, exclusive=False)
    assert second.wait(5)  # two ordinary tests at once
    alone = enters(tmp_path, exclusive=True)
    assert not alone.wait(WAIT_S)
    first.release.set()
    assert not alone.wait(WAIT_S)  # one shared holder is still inside
    second.release.set()
    assert alone.wait(5)
    alone.release.set()


def test_a_waiting_exclusive_holder_keeps_new_shared_ones_out(tmp_path):
    reader = enters(tmp_path, exclusive=False)
    assert reader.wait(5)
    writer = enters(tmp_path, exclusive=True)
    assert not writer.wait(WAIT_S)
    late = enters(tmp_path, exclusive=False)
    assert not late.wait(WAIT_S)  # it queues behind the writer rather than starving it
    reader.release.set()
    assert writer.wait(5)
    assert not late.wait(WAIT_S)  # the writer runs alone
    writer.release.set()
    assert late.wait(5)
    late.release.set()


def test_outside_xdist_nothing_is_locked():
    with machine(None, exclusive=True), machine(None, exclusive=True):
        pass
