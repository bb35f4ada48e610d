"""A checkpoint written by an older hmtrain (commit d1e6143, tests/fixtures/make_old_checkpoint.py)
resumes on the current code to the loss curve of that version's uninterrupted run."""
import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import run_cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_checkpoint"


def losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("step", [10, 15], ids=["at-the-phase-switch", "inside-the-memory-phase"])
def test_old_checkpoint_resumes_to_the_old_loss_curve(tmp_path, step):
    shutil.copytree(FIXTURE, tmp_path / "fixture")
    run, prepared = tmp_path / "fixture" / "run", tmp_path / "fixture" / "prepared"
    for later in sorted((run / "checkpoints").glob("step_*"))[::-1]:
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (run / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")

    overrides = json.loads((FIXTURE / "overrides.json").read_text())
    run_cli("train", "--config", "tiny", *overrides, f"data.prepared={prepared}",
            f"data.documents={tmp_path / 'unused.jsonl.gz'}", f"train.run_dir={run}", "--resume", cwd=tmp_path)
    expected = losses(FIXTURE / "expected_metrics.jsonl")
    assert [s for s, _ in expected] == list(range(1, 25))
    resumed = losses(run / "metrics.jsonl")
    assert [s for s, _ in resumed] == [s for s, _ in expected]
    # the code that wrote the fixture summed the memory FFN in another order (before the memory-kinds seam's
    # grouped gather): float rounding, 4e-7 at most; a state lost on resume moves the loss by far more
    for (step, loss), (_, want) in zip(resumed, expected):
        assert loss == pytest.approx(want, rel=1e-6, abs=1e-7), step
