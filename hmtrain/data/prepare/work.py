"""The work directory of `hmtrain data prepare`: `<prepared>.work/`, where the stages keep what they
have finished until the prepared directory is complete, so a killed or crashed prepare resumes.

  plan.json            what this work is for: the config keys that shape the output, and every input
                       file with its size and mtime. A rerun whose plan differs starts afresh.
  keys/NNNNN.npz       stage 1, per input file NNNNN: the sorted key of every document (sample.py)
  sample.json          stage 1: the sample's key thresholds (tree and tokenizer)
  sample/NNNNN.npz     stage 1, per input file: embeddings (and texts) of its sampled documents
  fit.json             stage 1 done: tree.pt and tokenizer/ are in out/
  routed/NNNNN/        stage 2, per input file: tokens grouped by (split, leaf) (route.py)
  units.json           stage 3: the pack units, leaf ranges of one split (pack.py)
  packed/SPLIT-UUUUU.json  stage 3, per unit: its shards, their sizes and checksums
  out/                 the prepared directory being built; moved to its final name at the end
  finished.json        written just before that move: a later prepare starts afresh

Every per-file or per-unit output is built under a temporary name and renamed when complete, so
"exists" means "finished": a rerun skips it and redoes only what is missing. Nothing here has a
manifest.json outside out/, and out/ only gets one as the very last step, so training never
accepts a work directory.
"""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hmtrain.util.files import atomic_write, replace_dir, staging_dir, write_json

log = logging.getLogger(__name__)

WORK_VERSION = 1


def work_dir_for(final: Path) -> Path:
    final = Path(final)
    return final.with_name(final.name + ".work")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez under a temporary name, renamed when complete."""
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh `<final>.tmp` directory, put in place of `final` when the block completes."""
    with staging_dir(final) as tmp:
        yield tmp
    replace_dir(tmp, final)


def input_stats(files: list[Path]) -> list[dict]:
    out = []
    for path in files:
        st = Path(path).stat()
        out.append({"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class Work:
    """The work directory of one prepare, for one plan."""

    def __init__(self, root: Path, plan: dict):
        self.root, self.plan = Path(root), plan
        self.out = self.root / "out"

    @classmethod
    def open(cls, final: Path, plan: dict) -> "Work":
        """Resume the work directory of `final` if its plan is this one; start it afresh otherwise."""
        root = work_dir_for(final)
        plan = {"version": WORK_VERSION, **plan}
        if root.exists():
            try:
                earlier = read_json(root / "plan.json")
            except (OSError, ValueError):
                earlier = None
            finished = (root / "finished.json").exists()
            if earlier == plan and not finished:
                log.info("resuming the unfinished prepare in %s", root)
            else:
                why = ("an earlier prepare finished it" if finished else
                       "its inputs or settings differ from this prepare's" if earlier is not None else
                       "it has no readable plan.json")
                log.warning("discarding %s: %s", root, why)
                shutil.rmtree(root)
        for sub in ("keys", "sample", "routed", "packed", "out"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        if not (root / "plan.json").exists():
            write_json(root / "plan.json", plan)
        return cls(root, plan)

    @classmethod
    def attach(cls, final: Path) -> "Work":
        """The work directory rank 0 opened (other ranks, after a barrier)."""
        root = work_dir_for(final)
        return cls(root, read_json(root / "plan.json"))

    def file_name(self, index: int) -> str:
        return f"{index:05d}"

    def keys(self, index: int, what: str) -> Path:
        """keys/NNNNN.{keys.npy, records.npy, json}: the json, written last, marks the file done."""
        return self.root / "keys" / f"{self.file_name(index)}.{what}"

    def sample(self, index: int) -> Path:
        return self.root / "sample" / f"{self.file_name(index)}.npz"

    def sample_texts(self, index: int) -> Path:
        return self.root / "sample" / f"{self.file_name(index)}.jsonl"

    def routed(self, index: int) -> Path:
        return self.root / "routed" / self.file_name(index)

    def packed(self, unit: dict) -> Path:
        return self.root / "packed" / f"{unit['split']}-{unit['unit']:05d}.json"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
