"""The probe file (probes.jsonl from `hmtrain data synth`): multiple-choice questions about people, each in
a frequency bucket (how often its person appears in the corpus). Reading and checking it, the buckets'
order, a subset balanced over buckets, the (prompt, choice) pairs a probe is scored by and which probes a
model got right. `hmtrain eval` (hmtrain/eval/probes.py) and validation during training
(hmtrain/train/probe_validation.py) both score probes with these and hmtrain/model/choices.py.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from torch import Tensor

from hmtrain.data.corpus.documents import numbered_jsonl_records

REQUIRED = ("question", "prompt", "answer", "choices", "bucket")


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


def balanced_probes(probes: list[dict], limit: int) -> list[dict]:
    """At most `limit` probes, as even over the frequency buckets as they allow: the buckets take turns (a
    bucket with too few gives its turns to the others), each from a seeded shuffle of its own probes, so the
    subset is the same on every rank and every run. Returned in file order."""
    if limit >= len(probes):
        return list(probes)
    rng = random.Random(0)
    queues = {}
    for bucket in bucket_order(Counter(p["bucket"] for p in probes)):
        members = [i for i, p in enumerate(probes) if p["bucket"] == bucket]
        rng.shuffle(members)
        queues[bucket] = members
    keep: list[int] = []
    while len(keep) < limit:
        for members in queues.values():
            if members and len(keep) < limit:
                keep.append(members.pop())
    return [probes[i] for i in sorted(keep)]


def probe_pairs(probes: list[dict], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt tokens, choice tokens) for every choice of every probe, the probes' choices consecutive."""
    prompts, choices = [], []
    for probe in probes:
        prompt_ids = tokenizer.encode(probe["prompt"])
        for choice in probe["choices"]:
            prompts.append(prompt_ids)
            choices.append(tokenizer.encode(choice))
    return prompts, choices


def probe_hits(probes: list[dict], scores: Tensor) -> list[int]:
    """1 where a probe's highest-scoring choice (scores as `probe_pairs` laid them out) is its answer, else 0."""
    hits, cursor = [], 0
    for probe in probes:
        n = len(probe["choices"])
        pick = int(scores[cursor:cursor + n].argmax())
        hits.append(int(probe["choices"][pick] == probe["answer"]))
        cursor += n
    return hits


def accuracy_by_bucket(probes: list[dict], hits: list[int]) -> dict[str, float]:
    """Share of hits per frequency bucket, in `bucket_order`, and over all probes ("all", last)."""
    correct: dict[str, list[int]] = defaultdict(list)
    for probe, hit in zip(probes, hits):
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
