"""The end of `prepare` (rank 0): the prepared directory's documents tables, merged sequence index
and manifest, assembled in the work directory's out/ from what the stages recorded. Shards and
documents tables were hashed by the process that wrote them; only the small files left (index
arrays, tree, tokenizer) are hashed here.
"""
from __future__ import annotations

import math
import os
import shutil

import numpy as np

from hmtrain.config import Config
from hmtrain.data.format.manifest import MANIFEST_VERSION, SPLITS, write_manifest
from hmtrain.data.format.sequences import write_split_index
from hmtrain.data.prepare import pack
from hmtrain.data.prepare.work import Work, read_json
from hmtrain.data.tokenizer import Tokenizer
from hmtrain.util.files import sha256_file


def write_output_manifest(cfg: Config, work: Work, num_files: int, units: list[dict], tokenizer: Tokenizer) -> dict:
    """Link the documents tables, merge the shard indexes per split, write and return the manifest."""
    data, branching, out = cfg.data, list(cfg.tree.branching), work.out
    records, tables = {}, []
    (out / "documents").mkdir(exist_ok=True)
    for i in range(num_files):
        name = f"documents/{i:05d}.parquet"
        if not (out / name).exists():
            try:
                os.link(work.routed(i) / "documents.parquet", out / name)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(work.routed(i) / "documents.parquet", out / name)
        records[name] = read_json(work.routed(i) / "done.json")["table"]
        tables.append(name)
    splits = {}
    for split in SPLITS:
        shards = []
        for unit in units:  # in unit order, so ids follow the leaves
            if unit["split"] == split:
                packed = read_json(work.packed(unit))
                shards += packed["shards"]
                records.update(packed["files"])
        splits[split] = write_split_index(out, split, shards, branching=branching)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel == "manifest.json":
            continue
        if rel not in records:
            records[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        elif records[rel]["bytes"] != path.stat().st_size:
            raise RuntimeError(f"{path}: {path.stat().st_size} bytes, its stage recorded {records[rel]['bytes']}")
    tokens, docs = pack.leaf_totals(work, num_files, math.prod(branching))
    counts = [read_json(work.keys(i, "json")) for i in range(num_files)]
    num_heldout = sum(c["first_train"] for c in counts)
    manifest = {
        "version": MANIFEST_VERSION,
        "seq_len": data.seq_len,
        "branching": branching,
        "splits": splits,
        "node_tokens": node_counts_from_leaves(tokens[0], branching),
        "node_documents": node_counts_from_leaves(docs[0], branching),
        "documents": {"train": sum(c["documents"] for c in counts) - num_heldout, "heldout": num_heldout},
        "document_tables": tables,
        "sample": read_json(work.root / "sample.json")["documents"],
        "heldout_fraction": data.heldout_fraction,
        "embedder": data.embedder,
        "tokenizer": "tokenizer",
        "tokenizer_name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "tree": "tree.pt",
        "source": str(data.documents),
        "files": dict(sorted(records.items())),
    }
    write_manifest(out / "manifest.json", manifest)
    return manifest


def node_counts_from_leaves(per_leaf: np.ndarray, branching: list[int]) -> list[list[int]]:
    """Sum leaf counts up the tree: out[i][j] = total over the leaves under node j of level i."""
    out = []
    for i in range(len(branching)):
        nodes = math.prod(branching[: i + 1])
        out.append(per_leaf.reshape(nodes, -1).sum(1).tolist())
    return out
