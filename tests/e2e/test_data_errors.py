"""Bad data through the CLI: each case exits 2 with one line naming the input, and changes nothing on disk."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.e2e.conftest import run_cli


def _snapshot(root: Path) -> dict[str, bytes]:
    # train.lock is the run directory's lock (hmtrain/train/rundir.py): taking it writes no output
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "train.lock"}


def _copy_prepared(prepared: dict, dest: Path) -> Path:
    shutil.copytree(prepared["root"] / "prepared", dest)
    return dest


def _shard(prepared_dir: Path) -> Path:
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    return prepared_dir / manifest["splits"]["train"]["shards"][1]["file"]


def _truncated_gz(work: Path, prepared: dict) -> list[str]:
    data = (prepared["root"] / "corpus" / "documents.jsonl.gz").read_bytes()
    (work / "trunc.jsonl.gz").write_bytes(data[: len(data) // 2])
    return ["data", "prepare", "--config", "tiny", *prepared["overrides"], f"data.documents={work / 'trunc.jsonl.gz'}",
            f"data.prepared={work / 'prepared'}", "--overwrite"]


def _garbled_parquet(work: Path, prepared: dict) -> list[str]:
    rows = [json.loads(line) for line in gzip.open(prepared["root"] / "corpus" / "documents.jsonl.gz", "rt")]
    path = work / "garbled.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]}), path,
                   row_group_size=50, compression="snappy")
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36  # the first page header, right after the PAR1 magic
    path.write_bytes(bytes(data))
    return ["data", "prepare", "--config", "tiny", *prepared["overrides"], f"data.documents={path}",
            f"data.prepared={work / 'prepared'}", "--overwrite"]


def _prepare_under_file(work: Path, prepared: dict) -> list[str]:
    return ["data", "prepare", "--config", "tiny", *prepared["overrides"], f"data.prepared={work / 'blocker' / 'p'}"]


def _synth_under_file(work: Path, prepared: dict) -> list[str]:
    return ["data", "synth", "--out", str(work / "blocker" / "corpus"), "--people", "5", "--documents", "10"]


def _bad_key(key: str) -> Callable[[Path, dict], list[str]]:
    def case(work: Path, prepared: dict) -> list[str]:
        # documents that would fail to read: the key must be refused before they are read
        args = _truncated_gz(work, prepared)
        return [*args[:-1], key, args[-1]]  # before --overwrite
    return case


def _train_on(damage: Callable[[Path], None], *extra: str) -> Callable[[Path, dict], list[str]]:
    def case(work: Path, prepared: dict) -> list[str]:
        damage(work / "prepared")
        return ["train", "--config", "tiny", *prepared["overrides"], f"data.prepared={work / 'prepared'}",
                f"train.run_dir={work / 'run'}", "train.pretrain_steps=2", "train.memory_steps=2",
                "logging.mlflow=false", *extra]
    return case


def _truncate_shard(root: Path) -> None:
    shard = _shard(root)
    shard.write_bytes(shard.read_bytes()[:5000])


def _flip_shard_byte(root: Path) -> None:
    shard = _shard(root)
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0xFF  # inside the first sample's tokens: same size, different content
    shard.write_bytes(bytes(data))


def _old_manifest(root: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))


def _eval_on_truncated_shard(work: Path, prepared: dict) -> list[str]:
    _truncate_shard(work / "prepared")
    return ["eval", "--config", "tiny", *prepared["overrides"], f"data.prepared={work / 'prepared'}",
            "--checkpoint", str(work / "no-run")]


CASES = {
    # (command builder, what the one error line must name)
    "truncated jsonl.gz": (_truncated_gz, "trunc.jsonl.gz: cannot read past line"),
    "garbled parquet": (_garbled_parquet, "garbled.parquet"),
    "prepare output under a file": (_prepare_under_file, "blocker is a file, not a directory"),
    "synth output under a file": (_synth_under_file, "blocker is a file, not a directory"),
    "embed_batch_size=0": (_bad_key("data.embed_batch_size=0"), "config key 'data.embed_batch_size'"),
    "em_steps=-1": (_bad_key("tree.em_steps=-1"), "config key 'tree.em_steps'"),
    "train on a truncated shard": (_train_on(_truncate_shard), "{shard} holds 5000 bytes"),
    "train on a corrupt shard, checksums on": (_train_on(_flip_shard_byte, "data.verify_checksums=true"),
                                               "{shard}: sha256 differs"),
    "train on a half-deleted directory": (_train_on(lambda root: (root / "tree.pt").unlink()), "tree.pt is missing"),
    "train on an older manifest": (_train_on(_old_manifest), "manifest version 1"),
    "eval on a truncated shard": (_eval_on_truncated_shard, "{shard} holds 5000 bytes"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_data_is_named_and_nothing_is_lost(prepared, tmp_path: Path, name: str) -> None:
    build, named = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    _copy_prepared(prepared, work / "prepared")
    (work / "blocker").write_text("a regular file where a directory is expected\n")
    named = named.format(shard=_shard(work / "prepared").name)  # a shard's name, e.g. train-00000-00001.tar
    args = build(work, prepared)
    before = _snapshot(work)
    proc = run_cli(*args, cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert _snapshot(work) == before, "the failed command changed files"
    assert {p.name for p in work.iterdir()} == {Path(k).parts[0] for k in before}  # no .tmp, no run dir


def test_prepare_warns_about_a_tree_larger_than_the_data_and_no_heldout(prepared, tmp_path: Path) -> None:
    proc = run_cli("data", "prepare", "--config", "tiny", *prepared["overrides"], "tree.branching=[16,16]",
                   "data.heldout_fraction=0", f"data.prepared={tmp_path / 'p'}", cwd=tmp_path)
    assert "256 leaves for 200 training documents" in proc.stderr
    assert "data.heldout_fraction=0" in proc.stderr and "`hmtrain eval`" in proc.stderr
