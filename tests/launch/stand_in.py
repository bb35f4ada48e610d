"""A stand-in for `hmtrain train` under torchrun, so the launchers can be tested in seconds.

It speaks the trainer's command line, `train --config CFG [key=value ...] [--resume]`, and keeps its run
directory the way the trainer does: `checkpoints/step_XXXXXXXX/` with DCP shards written by every rank
(`__<rank>_0.distcp`) and `trainer.json` marking it complete, `checkpoints/latest` naming the newest,
and `metrics.jsonl` (one row per step, from rank 0, cut back to the checkpoint's step on resume). It also
refuses what the trainer refuses: `--resume` with no checkpoint, or no `--resume` with one (exit 2).
A signal (SIGTERM/SIGINT) checkpoints at the end of the step and exits 128 + signal.

It checks itself: every step all-reduces each rank's rank + 1, and the running totals must equal those
of an uninterrupted run on this world size, so a rank missing from the group or a resume from the wrong
checkpoint exits non-zero.

Keys read: train.run_dir, train.pretrain_steps + train.memory_steps (the number of steps),
train.checkpoint_every, parallel.timeout_s; other keys and --config are accepted and ignored.
STAND_IN_STEP_S (environment) makes each step sleep that long, so a test can signal a job mid-run.
"""
import datetime
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

DEFAULTS = {"train.run_dir": "runs/default", "train.pretrain_steps": "2", "train.memory_steps": "2",
            "train.checkpoint_every": "500", "parallel.timeout_s": "120"}


def parse(argv: list[str]) -> tuple[dict, bool]:
    if not argv or argv[0] != "train":
        raise SystemExit(f"stand_in: error: expected `train --config CFG [key=value ...] [--resume]`, got {argv}")
    keys, resume, rest = dict(DEFAULTS), False, argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg == "--resume":
            resume = True
        elif arg == "--config":
            rest.pop(0)
        elif "=" in arg:
            key, value = arg.split("=", 1)
            keys[key] = value
        else:
            raise SystemExit(f"stand_in: error: unexpected argument {arg!r}")
    return keys, resume


class Stop:
    """The trainer's StopRequest: a signal asks for a checkpoint at the end of the step."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        print(f"stand_in rank {os.environ.get('RANK')}: got signal {signum}", file=sys.stderr, flush=True)
        self.signum = signum

    def agreed(self) -> int:
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


def latest(checkpoints: Path) -> Path | None:
    pointer = checkpoints / "latest"
    if pointer.is_file() and (checkpoints / pointer.read_text().strip() / "trainer.json").is_file():
        return checkpoints / pointer.read_text().strip()
    return None


def save(checkpoints: Path, step: int, state: dict, rank: int) -> Path:
    final, tmp = checkpoints / f"step_{step:08d}", checkpoints / f".step_{step:08d}.tmp"
    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (checkpoints / ".latest.tmp").write_text(final.name)
        os.replace(checkpoints / ".latest.tmp", checkpoints / "latest")
    dist.barrier()
    return final


def train(keys: dict, resume: bool) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(keys["parallel.timeout_s"])))
    run_dir = Path(keys["train.run_dir"])
    checkpoints = run_dir / "checkpoints"
    steps = int(keys["train.pretrain_steps"]) + int(keys["train.memory_steps"])
    every = int(keys["train.checkpoint_every"])
    step_s = float(os.environ.get("STAND_IN_STEP_S", "0"))
    found = latest(checkpoints)
    if found is not None and not resume:
        print(f"hmtrain train: error: {run_dir} already has checkpoints (latest {found.name}); pass --resume",
              file=sys.stderr)
        return 2
    if found is None and resume:
        print(f"hmtrain train: error: --resume: no checkpoint in {checkpoints}", file=sys.stderr)
        return 2

    state = {"total": torch.zeros(()), f"rank{rank}.steps": torch.zeros((), dtype=torch.int64)}
    step = 0
    if found is not None:
        dcp.load(state, checkpoint_id=str(found))
        step = json.loads((found / "trainer.json").read_text())["step"]
        print(f"stand_in rank {rank}: resumed from {found} at step {step}", file=sys.stderr, flush=True)
    metrics = run_dir / "metrics.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        metrics.write_text("".join(f"{r}\n" for r in rows if json.loads(r)["step"] <= step))
    stop = Stop()
    per_step = world * (world + 1) / 2
    while step < steps:
        time.sleep(step_s)
        contribution = torch.tensor(float(rank + 1))
        dist.all_reduce(contribution)
        state["total"] += contribution
        state[f"rank{rank}.steps"] += 1
        step += 1
        if state["total"].item() != step * per_step or state[f"rank{rank}.steps"].item() != step:
            raise RuntimeError(f"rank {rank} at step {step}: total {state['total'].item()} (expected "
                               f"{step * per_step}), own steps {state[f'rank{rank}.steps'].item()}")
        if rank == 0:
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "world_size": world}) + "\n")
        signum = stop.agreed()
        if signum or step % every == 0 or step == steps:
            saved = save(checkpoints, step, state, rank)
            if signum and step < steps:
                print(f"hmtrain train: stopped by signal {signum} at step {step}; checkpoint {saved}; "
                      "continue with --resume", file=sys.stderr, flush=True)
                return 128 + signum
    if rank == 0:
        print(f"checkpoint: {latest(checkpoints)}", flush=True)
    return 0


def main() -> None:
    keys, resume = parse(sys.argv[1:])
    rc = train(keys, resume)
    if dist.is_initialized():  # end cleanly, then leave without interpreter teardown (gloo threads)
        if rc == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
