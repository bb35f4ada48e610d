"""`hmtrain data import dictd` and `hmtrain data prepare` through the CLI: real processes, a real
SIGKILL mid-stage and a resume, and torchrun with 1 vs 2 ranks giving the same prepared directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hmtrain.data.format.prepared import PreparedData
from tests.dist.conftest import torchrun
from tests.e2e.conftest import MICRO, run_cli
from tests.unit.test_import_dictd import write_dictionary

WORDS = ("river bank money loan tree fruit apple stone metal iron copper silver gold water salt sea ship sail "
         "wind storm rain cloud sun moon star light heat fire").split()


def _dictionaries(directory: Path) -> None:
    rng = np.random.default_rng(0)
    for d, name in enumerate(("alpha", "beta", "gamma")):
        entries = []
        for i in range(60 + 10 * d):
            words = rng.choice(WORDS, size=int(rng.integers(8, 40))).tolist()
            entries.append(([f"{name}{i}"], (f"{name}{i}\n   " + " ".join(words) + ".\n").encode()))
        write_dictionary(directory, name, entries)


def _cli(*args: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """run_cli with extra environment variables."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "HMTRAIN_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
            **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "hmtrain.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"hmtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data_prepare")
    _dictionaries(root / "dictd")
    proc = run_cli("data", "import", "dictd", "--out", str(root / "docs"), "--dir", str(root / "dictd"), cwd=root)
    assert "wrote" in proc.stdout and "gamma.parquet: 80 documents" in proc.stdout
    overrides = [*MICRO, f"data.documents={root / 'docs'}", "data.shard_samples=4"]
    run_cli("data", "prepare", "--config", "tiny", *overrides, f"data.prepared={root / 'clean'}", cwd=root)
    return {"root": root, "overrides": overrides, "clean": _snapshot(root / "clean")}


def test_imported_dictionaries_prepare_into_documents_with_stable_ids(corpus) -> None:
    data = PreparedData.open(corpus["root"] / "clean", verify="checksums")
    ids = data.documents().column("id").to_pylist()
    assert len(ids) == 60 + 70 + 80 and ids[:2] == ["alpha:alpha0", "alpha:alpha1"] and ids[-1] == "gamma:gamma79"
    assert data.manifest["document_tables"] == [f"documents/{i:05d}.parquet" for i in range(3)]
    source = pq.read_table(corpus["root"] / "docs" / "beta.parquet").to_pylist()
    assert source[3]["id"] == "beta:beta3" and source[3]["text"].startswith("beta3\n   ")
    assert sum(data.splits.values()) > 3 * 2  # several pack units and shards


def test_sigkill_mid_stage_2_resumes_without_redoing_files(corpus, tmp_path: Path) -> None:
    args = ["data", "prepare", "--config", "tiny", *corpus["overrides"], f"data.prepared={tmp_path / 'p'}"]
    killed = _cli(*args, cwd=tmp_path, check=False, env={"HMTRAIN_PREPARE_KILL_AFTER": "stage2:1",
                                                           "HMTRAIN_LOG_LEVEL": "INFO"})
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "p.work" / "routed" / "00000" / "done.json").is_file()
    assert not (tmp_path / "p").exists()
    resumed = _cli(*args, cwd=tmp_path, env={"HMTRAIN_LOG_LEVEL": "INFO"})
    assert "resuming the unfinished prepare" in resumed.stderr
    assert "stage 2: input files to route: 2 of 3 to do (1 done earlier)" in resumed.stderr
    assert _snapshot(tmp_path / "p") == corpus["clean"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_two_ranks_give_the_same_prepared_directory(corpus, tmp_path: Path) -> None:
    args = ["-m", "hmtrain.cli", "data", "prepare", "--config", "tiny", *corpus["overrides"],
            "data.prepare_timeout_s=60"]
    torchrun(2, [*args, f"data.prepared={tmp_path / 'two'}"], cwd=tmp_path, timeout=300)
    assert _snapshot(tmp_path / "two") == corpus["clean"]

    # killed under 2 ranks mid-stage 2, finished by 1 process: still the same directory
    proc = torchrun(2, [*args, f"data.prepared={tmp_path / 'mixed'}"], cwd=tmp_path, timeout=300, check=False,
                    env={"HMTRAIN_PREPARE_KILL_AFTER": "stage2:1"})
    assert proc.returncode != 0 and (tmp_path / "mixed.work" / "routed").is_dir()
    run_cli(*args[2:], f"data.prepared={tmp_path / 'mixed'}", cwd=tmp_path)
    assert _snapshot(tmp_path / "mixed") == corpus["clean"]


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_bad_input_on_one_rank_stops_every_rank_naming_it(corpus, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(corpus["root"] / "docs", docs)
    (docs / "gamma.parquet").write_bytes((docs / "gamma.parquet").read_bytes()[:300])  # rank 0 has files 0 and 2
    (docs / "zeta.jsonl").write_text(json.dumps({"id": "z", "text": 7}) + "\n")  # rank 1 has files 1 and 3
    proc = torchrun(2, ["-m", "hmtrain.cli", "data", "prepare", "--config", "tiny", *corpus["overrides"],
                        f"data.documents={docs}", f"data.prepared={tmp_path / 'p'}", "data.prepare_timeout_s=60"],
                    cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert any("(rank 0): error:" in e and "gamma.parquet: cannot read parquet file" in e for e in errors), proc.stderr
    assert any("(rank 1): error:" in e and "zeta.jsonl: record 0: field 'text'" in e for e in errors), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]
