"""Beyond the paper: a high-retention encoder as the router of the deep tree levels.

The tree routes every document by its MiniLM vector (hmtrain/data/routing/tree.py). Here the first
`shallow_levels` levels keep that routing, and each deeper level is refitted on another encoder's
vectors (`hmtrain eval retention --deep-router SPEC`, e.g. a memory model's encoder): the children of
every node are k-means (hmtrain/data/routing/kmeans.py, the tree's own balance rule) on the training
documents that reach it, and documents and questions descend to the nearest child. A document's
vector is the mean of the encoder's vectors of its consecutive windows of `retention.n_ctx` tokens.

Reported per deep level, against MiniLM routing of the same documents:
  ari     adjusted Rand index of the two partitions (1: the same partition up to node names;
          0: what independent random partitions of these sizes would share)
  purity  share of documents whose node's most common MiniLM node is their own
  probe routing  per router, the share of probe questions (`data.probes`, from `hmtrain data synth`)
          that land on the node holding most of their person's documents under that same router:
          whether a question would fetch the memory its facts were trained into
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hmtrain.config import Config
from hmtrain.data.corpus.documents import read_documents
from hmtrain.data.corpus.probes import load_probes
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.embed import build_embedder, embed_texts
from hmtrain.data.routing.kmeans import assign, kmeans


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """ARI of two labelings of the same items (Hubert & Arabie 1985)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labelings must be 1-D and of one length, got {a.shape} and {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def pairs(x):
        return (x * (x - 1) // 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


def purity(hybrid: np.ndarray, reference: np.ndarray) -> float:
    groups: dict[int, Counter] = {}
    for h, r in zip(hybrid.tolist(), reference.tolist()):
        groups.setdefault(h, Counter())[r] += 1
    return sum(c.most_common(1)[0][1] for c in groups.values()) / len(hybrid)


def fit_deep_levels(vectors: torch.Tensor, shallow_paths: torch.Tensor, fit_mask: torch.Tensor,
                    branching: list[int], shallow_levels: int, cfg: Config) -> list[dict[int, torch.Tensor]]:
    """Per deep level, {parent node: [k, d] centroids} fitted on the `fit_mask` rows under that parent."""
    tree_cfg = cfg.tree
    levels: list[dict[int, torch.Tensor]] = []
    parents = shallow_paths[:, shallow_levels - 1].clone()
    for level in range(shallow_levels, len(branching)):
        k = branching[level]
        centroids: dict[int, torch.Tensor] = {}
        children = torch.empty_like(parents)
        for parent in parents.unique().tolist():
            members = parents == parent
            fit = vectors[members & fit_mask]
            if len(fit) == 0:
                fit = vectors[members]
            generator = torch.Generator().manual_seed(tree_cfg.seed * 7919 + level * 100_003 + parent)
            centroids[parent] = kmeans(fit, k, steps=tree_cfg.em_steps, subsample=tree_cfg.subsample,
                                       balance=tree_cfg.balance, generator=generator)
            ids, _ = assign(vectors[members], centroids[parent])
            children[members] = parent * k + ids
        levels.append(centroids)
        parents = children
    return levels


def route_deep(vectors: torch.Tensor, shallow_nodes: torch.Tensor, levels: list[dict[int, torch.Tensor]],
               branching: list[int], shallow_levels: int) -> torch.Tensor:
    """[n, deep levels] node ids below each row's shallow node."""
    out, parents = [], shallow_nodes.clone()
    for level, centroids in zip(range(shallow_levels, len(branching)), levels):
        k = branching[level]
        children = torch.empty_like(parents)
        for parent in parents.unique().tolist():
            members = parents == parent
            table = centroids.get(parent)
            if table is None:  # a node no training document reached: its first child
                children[members] = parent * k
                continue
            ids, _ = assign(vectors[members], table)
            children[members] = parent * k + ids
        out.append(children)
        parents = children
    return torch.stack(out, dim=1)


def _probe_hits(paths: dict[str, list[int]], probes: list[dict], question_paths: torch.Tensor, level: int) -> float:
    hits = counted = 0
    for probe, routed in zip(probes, question_paths.tolist()):
        doc_paths = [paths[d] for d in probe.get("doc_ids", []) if d in paths]
        if not doc_paths:
            continue
        counted += 1
        majority, _ = Counter(p[level] for p in doc_paths).most_common(1)[0]
        hits += int(routed[level] == majority)
    return hits / counted if counted else float("nan")


def compare_deep_routing(cfg: Config, data: PreparedData, vectors_of: Callable[[list[list[int]]], torch.Tensor], *,
                         label: str, spec: str, shallow_levels: int = 1, device: Optional[torch.device] = None) -> dict:
    """`vectors_of` maps token lists to one vector each: the deep levels' router, built by the caller (the
    retention probe's encoders, hmtrain/retention), named `label` (`spec`) in the result."""
    branching = list(data.manifest["branching"])
    if not 1 <= shallow_levels < len(branching):
        raise ValueError(f"--shallow-levels must be in [1, {len(branching) - 1}] for a tree of {len(branching)} "
                         f"levels, got {shallow_levels}")
    if not cfg.data.documents:
        raise ValueError("deep routing re-embeds the documents: set data.documents to the corpus")
    device = device or torch.device("cpu")
    table = data.documents().select(["id", "split", "path"]).to_pydict()
    row_of = {doc_id: i for i, doc_id in enumerate(table["id"])}
    texts = [""] * len(row_of)
    for doc in read_documents(cfg.data.documents, text_field=cfg.data.text_field, id_field=cfg.data.id_field):
        if doc.id in row_of:
            texts[row_of[doc.id]] = doc.text
    missing = [table["id"][i] for i, t in enumerate(texts) if not t]
    if missing:
        raise ValueError(f"data.documents {cfg.data.documents} lacks {len(missing)} documents of {data.root} "
                         f"(e.g. {missing[0]!r}): not the corpus this data was prepared from")
    tokenizer = data.tokenizer
    vectors = vectors_of(tokenizer.encode_batch(texts))
    minilm_paths = torch.tensor(table["path"], dtype=torch.int64)
    fit_mask = torch.tensor([s == "train" for s in table["split"]])
    levels = fit_deep_levels(vectors, minilm_paths, fit_mask, branching, shallow_levels, cfg)
    deep = route_deep(vectors, minilm_paths[:, shallow_levels - 1], levels, branching, shallow_levels)
    hybrid_paths = torch.cat([minilm_paths[:, :shallow_levels], deep], dim=1)

    result = {"encoder": label, "spec": spec, "shallow_levels": shallow_levels, "documents": len(texts), "levels": []}
    probe_paths = None
    if cfg.data.probes:
        probes = load_probes(cfg.data.probes, limit=cfg.eval.max_probes)
        questions = [p["question"] for p in probes]
        embedder = build_embedder(data.manifest["embedder"], device=str(device))
        q_minilm = data.tree.route(embed_texts(embedder, questions, progress=False))
        q_vectors = vectors_of(tokenizer.encode_batch(questions))
        q_deep = route_deep(q_vectors, q_minilm[:, shallow_levels - 1], levels, branching, shallow_levels)
        q_hybrid = torch.cat([q_minilm[:, :shallow_levels], q_deep], dim=1)
        doc_minilm = dict(zip(table["id"], minilm_paths.tolist()))
        doc_hybrid = dict(zip(table["id"], hybrid_paths.tolist()))
        probe_paths = (probes, q_minilm, q_hybrid, doc_minilm, doc_hybrid)
        result["probes"] = len(probes)
    for level in range(shallow_levels, len(branching)):
        entry = {"level": level + 1, "ari": adjusted_rand_index(minilm_paths[:, level].numpy(),
                                                                hybrid_paths[:, level].numpy()),
                 "purity": purity(hybrid_paths[:, level].numpy(), minilm_paths[:, level].numpy())}
        if probe_paths is not None:
            probes, q_minilm, q_hybrid, doc_minilm, doc_hybrid = probe_paths
            entry["probe_routing_minilm"] = _probe_hits(doc_minilm, probes, q_minilm, level)
            entry["probe_routing_hybrid"] = _probe_hits(doc_hybrid, probes, q_hybrid, level)
        result["levels"].append(entry)
    return result


def render_deep_routing(result: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    table = Table(title=f"deep levels routed by {result['encoder']} (levels 1..{result['shallow_levels']} stay "
                        f"MiniLM), {result['documents']} documents")
    columns = ["level", "ARI vs MiniLM", "purity"]
    if "probes" in result:
        columns += ["probe routing MiniLM", f"probe routing {result['encoder']}"]
    for column in columns:
        table.add_column(column, justify="right")
    for entry in result["levels"]:
        cells = [str(entry["level"]), f"{entry['ari']:.3f}", f"{100 * entry['purity']:.1f}%"]
        if "probes" in result:
            cells += [f"{100 * entry['probe_routing_minilm']:.1f}%", f"{100 * entry['probe_routing_hybrid']:.1f}%"]
        table.add_row(*cells)
    console.print(table)
