"""Long-tail knowledge probes: multiple-choice questions about people, grouped by how often
each person appears in the corpus (frequency bucket), with memory routed from the question
alone (embed it with the data's embedder, descend the tree) as the paper does, or from the prompt,
or from the oracle path (`eval.probe_routing`). The probe file, its buckets and routing are the
data's (hmtrain/data/corpus/probes.py, data/routing/questions.py, data/routing/oracle.py);
the scorer is the model's (hmtrain/model/choices.py), shared with validation during training.
"""
from __future__ import annotations

from typing import Optional

import torch

from hmtrain.data.corpus.probes import accuracy_by_bucket, probe_hits, probe_pairs
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.oracle import document_paths, oracle_path
from hmtrain.data.routing.questions import ProbeSet
from hmtrain.eval.scoring import Bank, choice_logprobs
from hmtrain.model import Transformer


def routing_agreement(data: PreparedData, probe_set: ProbeSet) -> dict[str, float]:
    """Per level: the share of probes whose node there is their oracle path's (the path most of their
    person's training documents were routed to, hmtrain/data/routing/oracle.py), over the probes that
    have one; {} when none has (probes from another corpus)."""
    documents = document_paths(data)
    levels = probe_set.paths.shape[1]
    hits, counted = [0] * levels, 0
    for probe, routed in zip(probe_set.probes, probe_set.paths.tolist()):
        oracle = oracle_path(probe, documents)
        if oracle is None:
            continue
        counted += 1
        for level in range(levels):
            hits[level] += int(routed[level] == oracle[level])
    if counted == 0:
        return {}
    return {f"level{level + 1}": hits[level] / counted for level in range(levels)}


def probe_accuracy(model: Transformer, bank: Optional[Bank], variant: str, probe_set: ProbeSet,
                   data: PreparedData, device: torch.device, batch_size: int = 64,
                   progress: str = "") -> dict[str, float]:
    """Accuracy per frequency bucket (and overall): the choice with the highest log-likelihood wins."""
    prompts, choices = probe_pairs(probe_set.probes, data.tokenizer)
    paths = torch.cat([path.expand(len(p["choices"]), -1) for p, path in zip(probe_set.probes, probe_set.paths)])
    scores = choice_logprobs(model, bank, variant, prompts, choices, paths, data.tokenizer.pad_id, device,
                             batch_size=batch_size, progress=progress)
    return accuracy_by_bucket(probe_set.probes, probe_hits(probe_set.probes, scores))
