"""Long-tail knowledge probes: multiple-choice questions about people, grouped by how often
each person appears in the corpus (frequency bucket), with memory routed from the question
alone (embed it with the data's embedder, descend the tree), as the paper does.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from hmtrain.data.corpus.documents import numbered_jsonl_records
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.embed import build_embedder, embed_texts
from hmtrain.eval.scoring import Bank, choice_logprobs
from hmtrain.model import Transformer

REQUIRED = ("question", "prompt", "answer", "choices", "bucket")


@dataclass
class ProbeSet:
    probes: list[dict]
    paths: Tensor  # [n, L] routed from each question


def load_probes(path: str | Path, limit: int = 0) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probes file {path} not found (make one with `hmtrain data synth`)")
    probes = []
    for index, (lineno, probe) in enumerate(numbered_jsonl_records(path)):
        check_probe(probe, f"{path}: line {lineno} (probe {index})")
        probes.append(probe)
    if not probes:
        raise ValueError(f"probes file {path} holds no probes")
    if limit and len(probes) > limit:
        # a seeded sample, not the head of the file: probe files are often sorted by frequency
        keep = sorted(random.Random(0).sample(range(len(probes)), limit))
        probes = [probes[i] for i in keep]
    return probes


def check_probe(probe: dict, where: str) -> None:
    """ValueError naming `where` for a probe that cannot be scored fairly. A choice is scored by the summed
    log-probability of its tokens, which is 0 for no tokens (above every real choice), and 0 for every
    choice after an empty prompt (the first then always wins); one choice always wins."""
    missing = [k for k in REQUIRED if k not in probe]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    for key in ("question", "prompt", "answer", "bucket"):
        if not isinstance(probe[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {probe[key]!r:.80}")
    for key in ("question", "prompt"):
        if not probe[key].strip():
            raise ValueError(f"{where}: {key} is empty")
    choices = probe["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: choices must be a list of strings, got {choices!r:.80}")
    if len(choices) < 2:
        raise ValueError(f"{where}: choices holds {len(choices)}; a multiple-choice probe needs at least 2")
    empty = [i for i, c in enumerate(choices) if not c.strip()]
    if empty:
        raise ValueError(f"{where}: choice {empty[0]} is empty (no tokens score 0, above every real choice)")
    twice = [c for c, n in Counter(choices).items() if n > 1]
    if twice:
        raise ValueError(f"{where}: choice {twice[0]!r} appears more than once")
    if probe["answer"] not in choices:
        raise ValueError(f"{where}: answer {probe['answer']!r} is not among its choices")


def route_probes(data: PreparedData, probes: list[dict], *, batch_size: int = 64, progress: bool = True) -> ProbeSet:
    embedder = build_embedder(data.manifest["embedder"], device="cuda" if torch.cuda.is_available() else "cpu")
    emb = embed_texts(embedder, [p["question"] for p in probes], batch_size=batch_size, progress=progress,
                      desc="embed probe questions")
    return ProbeSet(probes=probes, paths=data.tree.route(emb))


def routing_agreement(data: PreparedData, probe_set: ProbeSet) -> dict[str, float]:
    """Per level: how often a question lands on the node holding most of its person's documents."""
    table = data.documents().select(["id", "path"]).to_pydict()
    doc_path = dict(zip(table["id"], table["path"]))
    levels = probe_set.paths.shape[1]
    hits, counted = [0] * levels, 0
    for probe, routed in zip(probe_set.probes, probe_set.paths.tolist()):
        doc_paths = [doc_path[d] for d in probe.get("doc_ids", []) if d in doc_path]
        if not doc_paths:
            continue
        counted += 1
        for level in range(levels):
            majority, _ = Counter(p[level] for p in doc_paths).most_common(1)[0]
            hits[level] += int(routed[level] == majority)
    if counted == 0:
        return {}
    return {f"level{level + 1}": hits[level] / counted for level in range(levels)}


def probe_accuracy(model: Transformer, bank: Optional[Bank], variant: str, probe_set: ProbeSet,
                   data: PreparedData, device: torch.device, batch_size: int = 64,
                   progress: str = "") -> dict[str, float]:
    """Accuracy per frequency bucket (and overall): the choice with the highest log-likelihood wins."""
    tok = data.tokenizer
    prompts, choices, paths, owner = [], [], [], []
    for index, probe in enumerate(probe_set.probes):
        prompt_ids = tok.encode(probe["prompt"])
        for choice in probe["choices"]:
            prompts.append(prompt_ids)
            choices.append(tok.encode(choice))
            paths.append(probe_set.paths[index])
            owner.append(index)
    scores = choice_logprobs(model, bank, variant, prompts, choices, torch.stack(paths), tok.pad_id, device,
                             batch_size=batch_size, progress=progress)
    best: dict[int, tuple[float, str]] = {}
    cursor = 0
    for index, probe in enumerate(probe_set.probes):
        n = len(probe["choices"])
        pick = int(scores[cursor:cursor + n].argmax())
        best[index] = (float(scores[cursor + pick]), probe["choices"][pick])
        cursor += n
    correct: dict[str, list[int]] = defaultdict(list)
    for index, probe in enumerate(probe_set.probes):
        hit = int(best[index][1] == probe["answer"])
        correct[probe["bucket"]].append(hit)
        correct["all"].append(hit)
    return {bucket: sum(correct[bucket]) / len(correct[bucket]) for bucket in bucket_order(correct)}


def bucket_order(buckets) -> list[str]:
    """Frequency buckets ("1", "2-3", "10-99", "100+", ...) by their lower bound; labels without a
    leading number after them in first-seen order; "all" last."""
    labels = [b for b in dict.fromkeys(buckets) if b != "all"]

    def lower_bound(label: str) -> tuple[int, float]:
        found = re.match(r"\s*(\d+(?:\.\d+)?)", label)
        return (0, float(found.group(1))) if found else (1, 0.0)

    ordered = sorted(labels, key=lower_bound)  # stable: unnumbered labels keep first-seen order
    return ordered + (["all"] if "all" in buckets else [])


def bucket_counts(probes: list[dict]) -> dict[str, int]:
    counts = Counter(p["bucket"] for p in probes)
    return {b: counts[b] for b in bucket_order(counts)}
