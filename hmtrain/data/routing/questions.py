"""Routing probe questions: memory for a probe is chosen from its question alone (embedded with the
prepared data's embedder, then the tree's greedy descent), as the paper does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from hmtrain.data.routing.embed import build_embedder, embed_texts

if TYPE_CHECKING:
    from hmtrain.data.format.prepared import PreparedData


@dataclass
class ProbeSet:
    probes: list[dict]
    paths: Tensor  # [n, L] routed from each question


def route_probes(data: "PreparedData", probes: list[dict], *, batch_size: int = 64, progress: bool = True,
                 device: Optional[str] = None) -> ProbeSet:
    """`device` embeds the questions (None: CUDA when there is one)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder = build_embedder(data.manifest["embedder"], device=device)
    emb = embed_texts(embedder, [p["question"] for p in probes], batch_size=batch_size, progress=progress,
                      desc="embed probe questions")
    return ProbeSet(probes=probes, paths=data.tree.route(emb))
