"""The oracle route of a probe: the path of the training documents its question is about.

A synthetic probe names its person's documents (`doc_ids`, written by `hmtrain data synth`), and the
prepared data holds every document's split and routed path (documents/*.parquet). The oracle path of a
probe is the full path most of those documents in the train split were routed to (ties: the one of the
earliest document in `doc_ids`); a person with no training document falls back to all of its documents.
Its memory is the one those facts were trained into, so scoring probes with it says how much of the gap
between fetched and generic memory is routing rather than memory.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from hmtrain.data.format.prepared import PreparedData


def majority_path(paths: list[list[int]]) -> list[int]:
    """The path most often in `paths`; among equally common ones, the first seen."""
    if not paths:
        raise ValueError("majority_path needs at least one path")
    (path, _), = Counter(tuple(p) for p in paths).most_common(1)  # stable: ties keep first-seen order
    return list(path)


def document_paths(data: "PreparedData") -> dict[str, tuple[str, list[int]]]:
    """{document id: (split, routed path)} for every document of the prepared data."""
    table = data.documents(["id", "split", "path"]).to_pydict()
    return {doc_id: (split, path) for doc_id, split, path in zip(table["id"], table["split"], table["path"])}


def oracle_path(probe: dict, documents: dict[str, tuple[str, list[int]]]) -> Optional[list[int]]:
    """The probe's oracle path, or None when none of its documents is in the prepared data."""
    found = [documents[d] for d in probe.get("doc_ids", []) if d in documents]
    if not found:
        return None
    training = [path for split, path in found if split == "train"]
    return majority_path(training or [path for _, path in found])
