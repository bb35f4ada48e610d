"""The GPU check on CPU: its smoke run through launch/gpu_check.sh, its time limit, a failing section,
its decisions, and the memory phase trained under parallel.compile (what the GPU run times).

No test asserts a timing: the smoke's numbers mean nothing, only their presence does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmtrain.bench.gpu.report import comparisons, compile_decision, ffn_decision
from hmtrain.bench.gpu.train import SMOKE_DATA
from hmtrain.bench.gpu_check import SECTIONS, Section, run_all

REPO = Path(__file__).resolve().parents[2]
STATUSES = {"ok", "failed", "timed_out", "skipped"}


def env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HMTRAIN_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(tmp_path), "PYTHON": sys.executable}


def check(records: list[dict], name: str) -> dict:
    record = next(r for r in records if r["name"] == name)
    assert record["status"] == "ok", record
    return record["results"]


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "launch" / "gpu_check.sh"), str(out), "--smoke"], cwd=tmp_path,
                          env=env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]
    report = json.loads((out / "gpu_check.json").read_text())
    records = report["sections"]
    assert [r["name"] for r in records] == [s.name for s in SECTIONS]
    assert report["smoke"] is True and {r["status"] for r in records} <= STATUSES
    assert check(records, "environment")["torch"]
    tiny = check(records, "memory_ffn")["presets"]["tiny"]
    assert {"torch eager", "widened FFN (torch)", "dense GEMM ceiling"} <= set(tiny["rows"])
    assert tiny["rows"]["torch eager"]["fwdbwd_ms"] > 0
    assert check(records, "data")["sequences"]["train"] > 0
    assert check(records, "attention")["shapes"]["tiny"]["output_error"] < 1e-4  # flex == sdpa, forward
    for name in ("train_160m", "train_160m_checkpointing"):
        results = check(records, name)
        assert results["predicted_gib"] > 0
        for phase in ("pretrain", "memory"):
            assert {"step_s", "tokens_per_s", "loss_first", "loss_last", "loss_fell"} <= set(results["phases"][phase])
    assert set(check(records, "train_160m_widened")["phases"]) == {"pretrain"}
    assert all(check(records, "eval_export_generate")[c]["rc"] == 0 for c in ("eval", "export", "generate"))
    assert check(records, "embedder")["documents_per_s"] > 0
    assert next(r for r in records if r["name"] == "collectives")["status"] == "skipped"
    assert set(report["decisions"]) == {"model.ffn_impl=auto", "parallel.compile (cuda)"}
    assert report["comparisons"]["memory phase step / widened anchor step"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| section | status | seconds | result |" in table
    assert all(f"| {s.name} | " in table for s in SECTIONS)


def test_time_limit_stops_cleanly_and_skips_the_rest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hmtrain.bench.gpu_check", "--out", str(tmp_path), "--smoke",
                           "--time-limit", "2"], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert len(records) == len(SECTIONS)
    assert records[0]["status"] in ("ok", "timed_out")  # the only section started
    assert all(r["status"] == "skipped" and r["error"].startswith("time limit") for r in records[1:])
    assert "| train_160m | skipped |" in (tmp_path / "gpu_check.md").read_text()


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path):
    sections = (Section("no_such_section", 60, smoke_budget_s=60),
                Section("after_the_failure", 60, needs=("no_such_section",)),
                next(s for s in SECTIONS if s.name == "collectives"))
    report = run_all(sections, tmp_path, time_limit=120, smoke=True)
    failed, dependent, last = report["sections"]
    assert failed["status"] == "failed" and failed["error"].startswith("KeyError") and "\n" not in failed["error"]
    assert dependent["status"] == "skipped" and "needs no_such_section" in dependent["error"]
    assert last["status"] == "skipped" and last["results"]["summary"].startswith("not tested: one GPU")
    assert "| no_such_section | failed |" in (tmp_path / "gpu_check.md").read_text()


def ffn_records(error: float, speedup: float) -> list[dict]:
    presets = {name: {"triton_error": 1e-3, "triton_vs_eager": 1.4} for name in ("160m", "410m", "1.4b")}
    presets["410m"] = {"triton_error": error, "triton_vs_eager": speedup}
    return [{"name": "memory_ffn", "status": "ok", "results": {"presets": presets}}]


def test_ffn_decision_needs_every_shape_correct_and_faster():
    assert ffn_decision(ffn_records(1e-3, 1.2))["value"] == "triton"
    assert ffn_decision(ffn_records(0.5, 1.2))["value"] == "torch"
    assert ffn_decision(ffn_records(1e-3, 0.9))["value"] == "torch"
    assert ffn_decision([{"name": "memory_ffn", "status": "timed_out", "results": {}}])["value"] == "undecided"
    raised = ffn_records(1e-3, 1.2)
    raised[0]["results"]["presets"]["1.4b"] = {"error": "RuntimeError: the kernel raised"}
    assert ffn_decision(raised)["value"] == "torch"
    no_triton = [{"name": "memory_ffn", "status": "ok", "results": {"presets": {"tiny": {"rows": {}}}}}]
    assert ffn_decision(no_triton)["value"] == "undecided"


def train_record(name: str, pretrain_s: float, memory_s: float) -> dict:
    phases = {"pretrain": {"step_s": pretrain_s, "first_step_s": 30.0}, "memory": {"step_s": memory_s}}
    return {"name": name, "status": "ok", "results": {"phases": phases}}


def test_compile_decision_needs_both_phases_faster():
    eager = train_record("train_160m", 0.10, 0.20)
    compiled = train_record("train_160m_compile", 0.08, 0.15)
    assert compile_decision([eager, compiled])["value"] == "on"
    assert comparisons([eager, compiled])["compiled step / eager, memory phase"] == pytest.approx(0.75)
    assert comparisons([eager])["compiled step / eager, memory phase"] is None
    assert compile_decision([eager, train_record("train_160m_compile", 0.08, 0.21)])["value"] == "off"
    assert compile_decision([eager])["value"] == "undecided"


@pytest.mark.slow
def test_memory_phase_trains_under_compile_on_cpu(tmp_path):
    """parallel.compile=true through the memory phase gives the eager run's losses (inductor on CPU)."""
    def cli(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "hmtrain.cli", *args], cwd=tmp_path, env=env(tmp_path),
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    data = [*SMOKE_DATA, "model.n_layers=1", f"data.documents={tmp_path / 'corpus' / 'documents.jsonl.gz'}",
            f"data.prepared={tmp_path / 'prepared'}"]
    cli("data", "synth", "--out", str(tmp_path / "corpus"), "--people", "40", "--documents", "200")
    cli("data", "prepare", "--config", "tiny", *data)
    train = [*data, "train.pretrain_steps=1", "train.memory_steps=2", "train.global_batch_size=4",
             "train.micro_batch_size=4", "train.progress=false", "train.log_every=1", "logging.mlflow=false"]
    losses = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cli("train", "--config", "tiny", *train, f"train.run_dir={tmp_path / name}", f"parallel.compile={flag}")
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["phase"], r["loss"]) for r in rows]
    assert [phase for phase, _ in losses["compiled"]] == [0.0, 1.0, 1.0]
    for (_, eager), (_, compiled) in zip(losses["eager"], losses["compiled"]):
        assert compiled == pytest.approx(eager, rel=1e-4)
