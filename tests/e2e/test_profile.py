"""`train.profile_steps`: the listed steps leave a torch.profiler trace per rank; the others nothing."""
import json

from tests.e2e.conftest import run_cli


def test_profiled_steps_leave_a_chrome_trace(prepared, tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", "--config", "tiny", *prepared["overrides"], "train.pretrain_steps=2", "train.memory_steps=1",
            "train.profile_steps=[2,3]", "logging.mlflow=false", f"train.run_dir={run_dir}", cwd=tmp_path)
    assert sorted(p.name for p in (run_dir / "profiles").iterdir()) == ["step_00000002", "step_00000003"]
    for step in ("step_00000002", "step_00000003"):  # an anchor step and a memory step
        trace = json.loads((run_dir / "profiles" / step / "rank0.trace.json").read_text())
        names = {event.get("name", "") for event in trace["traceEvents"]}
        assert any("aten::" in name for name in names), sorted(names)[:20]


def test_a_profile_step_from_zero_is_refused(prepared, tmp_path):
    proc = run_cli("train", "--config", "tiny", *prepared["overrides"], "train.profile_steps=[0]",
                   f"train.run_dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "train.profile_steps" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
