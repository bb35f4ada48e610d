"""The GPU check: one command, one GPU, at most ten minutes, one JSON and one markdown table.

    python -m hmtrain.bench.gpu_check --out DIR [--report DIR] [--time-limit S] [--only a,b] [--smoke]
    bash launch/gpu_check.sh DIR                     # the same, with the carried wheels installed

Sections run in order of value (`SECTIONS`), each in its own process under its own time budget,
so a Triton crash, a CUDA error or an out-of-memory leaves the next section a clean device. A
section writes its results as it goes (DIR/sections/NAME.json); at its budget, or at the check's
time limit, it is stopped and keeps what it wrote (`timed_out`); one that raises records its
one-line error (`failed`); one that no time or no input is left for is `skipped`, with why. The
check always exits 0 after writing DIR/gpu_check.json and DIR/gpu_check.md; exit 2 is bad input.

`--smoke` runs every section on CPU with tiny shapes in seconds (the test suite does, so the
command cannot rot); its numbers mean nothing. This file imports no torch: a torch that hmtrain
cannot import shows up as one section's one-line error, not as a traceback here.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hmtrain.bench.gpu.report import comparisons, decisions, render_markdown


@dataclass(frozen=True)
class Section:
    name: str
    budget_s: float        # on the GPU; --smoke gives each section `smoke_budget_s`
    needs: tuple[str, ...] = ()
    smoke_budget_s: float = 120.0


SECTIONS = (
    Section("environment", 40),
    Section("collectives", 5),  # no GPU work: it only says why it cannot run, and costs a second
    Section("memory_ffn", 200),  # Triton autotuning compiles ~45 kernels for the first shape
    Section("attention", 90),  # compiling FlexAttention forward and backward, per head_dim
    Section("data", 45),
    Section("train_160m", 75, needs=("data",)),
    Section("train_160m_compile", 90, needs=("data",)),
    Section("train_160m_checkpointing", 60, needs=("data",)),
    Section("train_160m_widened", 45, needs=("data",)),
    Section("eval_export_generate", 60, needs=("train_160m",)),
    Section("train_410m", 75, needs=("data",)),
    Section("train_1.4b", 90, needs=("data",)),
    Section("embedder", 40),
)
MIN_START_S = 10.0   # a section is not started with less than this left (or half a shorter limit)
KILL_GRACE_S = 5.0   # after SIGTERM, before SIGKILL


def run_section(section: Section, out: Path, smoke: bool, timeout: float) -> dict:
    """Run one section in a child process; its record, whatever happened to it."""
    path = out / "sections" / f"{section.name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hmtrain.bench.gpu.sections", section.name, "--out", str(out),
           *(["--smoke"] if smoke else [])]
    started = time.monotonic()
    log = (out / "logs" / f"{section.name}.log").open("w")
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(child)
    finally:
        log.close()
    record = read_record(path)
    record.update(name=section.name, seconds=round(time.monotonic() - started, 1))
    if timed_out:
        record.update(status="timed_out", error=f"stopped at its {timeout:.0f} s budget; results so far kept")
    elif record.get("status") not in ("ok", "failed", "skipped"):
        record.update(status="failed", error=f"exited {child.returncode} without a result; see logs/"
                                             f"{section.name}.log: {last_line(out / 'logs' / f'{section.name}.log')}")
    return record


def stop(child: subprocess.Popen) -> None:
    """SIGTERM the section's process group (torch.compile workers too), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"results": {}}


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_all(sections: tuple[Section, ...], out: Path, time_limit: float, smoke: bool, runner=run_section,
            report_dir: Optional[Path] = None) -> dict:
    """Every section in order, inside `time_limit` seconds; the report, rewritten into `report_dir`
    (default `out`) after every section, so a check killed from outside still leaves its table."""
    report_dir = report_dir or out
    for folder in (out / "sections", out / "logs", report_dir):
        folder.mkdir(parents=True, exist_ok=True)
    started, wall = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    records: list[dict] = []
    for section in sections:
        left = time_limit - (time.monotonic() - started)
        missing = [need for need in section.needs if status_of(records, need) != "ok"]
        if left < min(MIN_START_S, time_limit / 2):
            record = skipped(section, f"time limit: {max(left, 0):.0f} s of {time_limit:.0f} s left")
        elif missing:
            record = skipped(section, f"needs {', '.join(missing)}, which did not finish ok")
        else:
            budget = section.smoke_budget_s if smoke else section.budget_s
            record = runner(section, out, smoke, min(budget, left))
        records.append(record)
        print(f"[gpu_check] {section.name}: {record['status']} ({record.get('seconds', 0)} s)"
              f"{' - ' + record['error'] if record.get('error') else ''}", flush=True)
        write_report(report_dir, wall, started, time_limit, smoke, records)
    return write_report(report_dir, wall, started, time_limit, smoke, records)


def status_of(records: list[dict], name: str) -> Optional[str]:
    return next((r["status"] for r in records if r["name"] == name), None)


def skipped(section: Section, why: str) -> dict:
    return {"name": section.name, "status": "skipped", "seconds": 0.0, "error": why, "results": {}}


def write_report(out: Path, wall: str, started: float, time_limit: float, smoke: bool, records: list[dict]) -> dict:
    report = {"version": 1, "started": wall, "smoke": smoke, "time_limit_s": time_limit,
              "elapsed_s": round(time.monotonic() - started, 1), "sections": records,
              "comparisons": comparisons(records), "decisions": decisions(records)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(report))
    return report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json, gpu_check.md, logs/")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds for the whole check (default 540)")
    p.add_argument("--only", default=None, help=f"comma list of sections (default all: "
                                                f"{','.join(s.name for s in SECTIONS)})")
    p.add_argument("--report", type=Path, default=None, help="where gpu_check.json and gpu_check.md go "
                                                             "(default --out)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds: numbers mean nothing")
    args = p.parse_args(argv)
    if args.time_limit <= 0:
        p.error(f"--time-limit must be > 0 seconds, got {args.time_limit:g}")
    names = [s.name for s in SECTIONS]
    wanted = names if args.only is None else args.only.split(",")
    unknown = [n for n in wanted if n not in names]
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    args.sections = tuple(s for s in SECTIONS if s.name in wanted)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    report_dir = args.report or args.out
    report = run_all(args.sections, args.out, args.time_limit, args.smoke, report_dir=report_dir)
    print(f"[gpu_check] wrote {report_dir / 'gpu_check.json'} and {report_dir / 'gpu_check.md'} "
          f"in {report['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
