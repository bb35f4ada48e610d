"""A torchrun worker stops when its supervisor dies.

torchrun starts every rank in a session of its own, so when torchrun itself is SIGKILLed (by a user, an
OOM killer, a scheduler that kills the process tree's top) nothing tells the ranks: they would train on
unsupervised while the launcher reports the job dead. Linux's parent-death signal closes that gap: the
kernel sends SIGTERM to the rank the moment its parent exits, and SIGTERM is the signal every rank already
handles by agreeing to stop, checkpointing at the end of its step and leaving with 143.

A rank of hmtrain's launcher (hmtrain/parallel/launch.py) also hands its one-line error to it instead of
printing it, so that the launcher prints each different line once (`report_to_launcher`).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHED = "HMTRAIN_LAUNCHER"  # set for the ranks hmtrain.parallel.launch starts


def report_to_launcher(who: str, text: str) -> bool:
    """In a rank started by hmtrain.parallel.launch: hand its error line (`who`: "hmtrain train", `text`:
    "error: ...") to the launcher through torchrun's error file instead of printing it; False elsewhere (the
    caller prints). The timestamp orders failures, as torchrun's own error files do."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHED) != "1" or not path:
        return False
    try:
        with open(path, "w") as f:
            json.dump({"message": f"{who}: {text}", "timestamp": int(time.time()), "hmtrain": [who, text]}, f)
        return True
    except OSError:
        return False


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def stop_with_supervisor(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `signum` when this process's parent dies; True when that is now in force.

    Only for torchrun workers on Linux: a process started by a shell or a test keeps its usual lifetime."""
    if not (under_torchrun() and sys.platform.startswith("linux")):
        return False
    supervisor = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        log.warning("could not ask for a signal at the supervisor's death (errno %d)", ctypes.get_errno())
        return False
    if os.getppid() != supervisor or supervisor == 1:  # it died before the request took effect
        os.kill(os.getpid(), signum)
    return True
