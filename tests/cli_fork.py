"""Run `python -m hmtrain.cli ARGS` as a fork of one process that has imported it already.

Every end-to-end test drives the real CLI in a process of its own; a new interpreter spends 2-3 s of CPU
importing torch, torch.distributed.checkpoint, MLflow and hmtrain before the command does anything, and the
suite starts a few hundred of them. This module's server (`python -m tests.cli_fork`, one per pytest worker)
imports them once and forks a child for each call. The child is a process of its own, as before: it takes
the call's working directory, environment, argv and standard streams (files), runs the module as
`__main__` with runpy (what `python -m` does), and leaves through the interpreter's own shutdown
(non-daemon threads joined, atexit handlers run, streams flushed), so its exit code is the CLI's. What it
shares with the server is only what the server imported, under the environment the server started with;
nothing it does reaches the server. A command whose module reads its environment while being imported would
see the server's, so the server imports only modules that do not (not transformers or huggingface_hub).

The client (`ForkedCLI.run`) returns a subprocess.CompletedProcess and raises subprocess.TimeoutExpired,
as subprocess.run does; on a timeout the server kills the child's process group.
HMTRAIN_TEST_FORK=0 turns it off: every call is `subprocess.run` again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = ("hmtrain.cli", "hmtrain.train.trainer", "hmtrain.eval.evaluate", "torch._dynamo", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store")
POLL_S = 0.01


def _child(request: dict, protocol: tuple[int, int]) -> None:
    """In the forked child: become the call's process, run its module as __main__, exit as Python does."""
    import runpy

    with open(os.devnull, "r+") as null:
        for fd in protocol:  # off the server's pipes; the numbers stay valid for the server's `with` to close
            os.dup2(null.fileno(), fd)
    os.setpgid(0, 0)  # a timeout kills the command and whatever it started
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    with open(os.devnull) as null, open(request["stdout"], "w") as out, open(request["stderr"], "w") as err:
        os.dup2(null.fileno(), 0)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    sys.argv = [request["module"], *request["argv"]]
    sys.modules.pop(request["module"], None)  # run afresh as __main__, as `python -m` does (its imports stay)
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)  # the module returned without sys.exit: a clean exit, as `python -m` gives


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"rc": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"rc": -signal.SIGKILL, "timed_out": True}
        time.sleep(POLL_S)


def serve() -> None:
    """Read one JSON request a line on stdin, fork it, answer {"rc", "timed_out"} a line on stdout."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1:  # forking a process with threads could copy a lock some thread holds
        raise SystemExit(f"tests.cli_fork: the preloaded modules started threads: {threading.enumerate()}")
    requests, answers = os.dup(0), os.dup(1)
    with os.fdopen(requests) as inbox, os.fdopen(answers, "w") as outbox:
        outbox.write("ready\n")
        outbox.flush()
        for line in inbox:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request, (requests, answers))  # never returns: SystemExit ends the child's interpreter
            outbox.write(json.dumps(_wait(pid, request["timeout"])) + "\n")
            outbox.flush()


class ForkedCLI:
    """One server for this pytest process, started on first use."""

    def __init__(self):
        self.server: subprocess.Popen | None = None
        self.lock = threading.Lock()

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("HMTRAIN_TEST_FORK", "1") != "0"

    def _start(self, env: dict) -> subprocess.Popen:
        server = subprocess.Popen([sys.executable, "-m", "tests.cli_fork"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[1])
        if server.stdout.readline() != "ready\n":
            server.kill()
            raise RuntimeError("tests.cli_fork: the server did not start (its error is above)")
        return server

    def run(self, module: str, args: list[str], *, cwd: Path, env: dict, timeout: float,
            server_env: dict) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory() as streams:
            if self.server is None or self.server.poll() is not None:
                self.server = self._start(server_env)
            out, err = Path(streams) / "stdout", Path(streams) / "stderr"
            request = {"module": module, "argv": list(args), "cwd": str(cwd), "env": env, "timeout": timeout,
                       "stdout": str(out), "stderr": str(err)}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            answer = json.loads(self.server.stdout.readline())
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        argv = [sys.executable, "-m", module, *args]
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(argv, answer["rc"], stdout, stderr)

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.stdin.close()
            self.server.wait(timeout=30)


if __name__ == "__main__":
    serve()
