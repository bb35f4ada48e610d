"""A command pointed at outputs that already exist refuses with exit 2 and leaves them as they were."""
from pathlib import Path

import pytest

from tests.e2e.conftest import run_cli
from tests.unit.test_import_dictd import ENTRIES, write_dictionary


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def synth_corpus(tmp: Path) -> tuple[list[str], Path]:
    run_cli("data", "synth", "--out", str(tmp / "corpus"), "--people", "5", "--documents", "10", cwd=tmp)
    return ["data", "synth", "--out", str(tmp / "corpus"), "--people", "6", "--documents", "12"], tmp / "corpus"


def imported(tmp: Path) -> tuple[list[str], Path]:
    write_dictionary(tmp / "dictd", "mini", ENTRIES)
    args = ["data", "import", "dictd", "--out", str(tmp / "out"), "--dir", str(tmp / "dictd"), "mini"]
    run_cli(*args, cwd=tmp)
    return args, tmp / "out"


def demo_dir(tmp: Path) -> tuple[list[str], Path]:
    (tmp / "demo" / "seed0").mkdir(parents=True)
    (tmp / "demo" / "seed0" / "results.json").write_text("{}\n")  # what an earlier demo left
    return ["demo", "--out", str(tmp / "demo")], tmp / "demo"


@pytest.mark.parametrize("case", [synth_corpus, imported, demo_dir], ids=lambda f: f.__name__)
def test_existing_output_is_refused_and_kept(tmp_path, case):
    args, out = case(tmp_path)
    before = snapshot(out)
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(out) in proc.stderr and "--overwrite" in proc.stderr
    assert snapshot(out) == before
    if case is not demo_dir:  # (the demo with --overwrite would run the whole pipeline)
        assert run_cli(*args, "--overwrite", cwd=tmp_path).returncode == 0
