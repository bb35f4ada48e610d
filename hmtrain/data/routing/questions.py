"""Routing probes: the path whose memory a probe is scored with (`eval.probe_routing`).

  question  the question alone, embedded with the prepared data's embedder, then the tree's greedy
            descent, as the paper does (and validation during training)
  context   the probe's `prompt` the same way: the text the model conditions on when it scores the
            choices (a probe has no other context; the prompt is the choices' shared prefix)
  oracle    the path of the training documents the probe is about (hmtrain/data/routing/oracle.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from hmtrain.data.routing.embed import build_embedder, embed_texts
from hmtrain.data.routing.oracle import document_paths, oracle_path

if TYPE_CHECKING:
    from hmtrain.data.format.prepared import PreparedData

ROUTED_TEXT = {"question": "question", "context": "prompt"}  # the probe field each text routing embeds
ROUTINGS = (*ROUTED_TEXT, "oracle")


@dataclass
class ProbeSet:
    probes: list[dict]
    paths: Tensor  # [n, L] the path each probe's memory comes from
    routing: str = "question"  # how `paths` were chosen: one of ROUTINGS


def route_probes(data: "PreparedData", probes: list[dict], *, routing: str = "question", batch_size: int = 64,
                 progress: bool = True, device: Optional[str] = None) -> ProbeSet:
    """`device` embeds the texts (None: CUDA when there is one)."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown probe routing {routing!r}; expected one of {ROUTINGS}")
    if routing == "oracle":
        return ProbeSet(probes=probes, paths=oracle_paths(data, probes), routing=routing)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder = build_embedder(data.manifest["embedder"], device=device)
    field = ROUTED_TEXT[routing]
    emb = embed_texts(embedder, [p[field] for p in probes], batch_size=batch_size, progress=progress,
                      desc=f"embed probe {field}s")
    return ProbeSet(probes=probes, paths=data.tree.route(emb), routing=routing)


def oracle_paths(data: "PreparedData", probes: list[dict]) -> Tensor:
    """[n, L] every probe's oracle path; a ValueError names the first probe that has none."""
    documents = document_paths(data)
    paths = []
    for index, probe in enumerate(probes):
        path = oracle_path(probe, documents)
        if path is None:
            raise ValueError(f"eval.probe_routing=oracle: probe {probe.get('id', index)!r} names none of the "
                             f"documents of {data.root} (its doc_ids): oracle routing needs the probes "
                             "`hmtrain data synth` wrote with the corpus this data was prepared from")
        paths.append(path)
    return torch.tensor(paths, dtype=torch.int64).reshape(len(probes), len(data.tree.branching))
