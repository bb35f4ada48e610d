"""Probe questions in validation during training (`train.eval_probes`): accuracy per frequency bucket at the
weights of a step, next to the held-out loss (hmtrain/train/validation.py, which calls this).

At most `train.eval_probes` probes of `data.probes`, balanced over the buckets (`balanced_probes`), are read
and routed from their questions once, before anything is written; every validation scores the same ones, with
`hmtrain eval`'s scorer (hmtrain/model/choices.py) and rule (a probe is right when its answer is the choice of
highest log-likelihood), so the accuracy at step N is what `hmtrain eval` gives the step-N checkpoint for
these probes. Under W ranks a probe goes where a held-out sequence of its subtree would (validation.py's
`this_ranks_ids`); every rank runs as many batches, padded to one shape, because each forward is a collective.
Hits per bucket are summed with the held-out sums, in the same all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from hmtrain.config import Config, ConfigError
from hmtrain.data.corpus.probes import balanced_probes, bucket_order, load_probes, probe_hits, probe_pairs
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.questions import ProbeSet, route_probes
from hmtrain.model.choices import choice_logprobs, fixed_width
from hmtrain.util.metric_names import metric_key


def validation_probes(cfg: Config, data: PreparedData, device: torch.device) -> Optional[ProbeSet]:
    """The probes every validation scores, routed; None when validation scores none. Called before anything is
    written, so a missing or bad probe file is a one-line error naming it."""
    tc = cfg.train
    if not (tc.eval_every and tc.eval_probes):
        return None
    try:
        probes = balanced_probes(load_probes(cfg.data.probes), tc.eval_probes)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"config key 'data.probes' (for train.eval_probes): {exc}") from exc
    width = fixed_width(*probe_pairs(probes, data.tokenizer))
    if width > cfg.data.seq_len:
        raise ConfigError(f"config key 'data.probes': a probe's prompt and choice take {width} tokens, more than "
                          f"data.seq_len={cfg.data.seq_len}, the longest sequence the model reads")
    return route_probes(data, probes, progress=False, device=str(device))


@dataclass
class ProbeWork:
    """This rank's share of the probes, laid out as (prompt, choice) pairs, and the shape every rank runs."""
    probes: list[dict]
    prompts: list[list[int]]
    choices: list[list[int]]
    paths: Tensor  # [pairs, L]: each pair's question's path
    rounds: int  # batches every rank runs (the busiest rank's)
    width: int  # tokens per row of every batch
    buckets: list[str]  # all buckets of the probe set, in order: the all-reduced hits' layout
    counts: list[int]  # probes per bucket, over all ranks


def probe_work(probe_set: ProbeSet, tokenizer, ids_per_rank: list[np.ndarray], rank: int, micro: int) -> ProbeWork:
    """`ids_per_rank[r]`: the indices of the probes rank r scores (every rank's, so each can size the rounds)."""
    probes = probe_set.probes
    pairs_per_rank = [sum(len(probes[i]["choices"]) for i in ids) for ids in ids_per_rank]
    mine = [probes[i] for i in ids_per_rank[rank]]
    prompts, choices = probe_pairs(mine, tokenizer)
    paths = [probe_set.paths[i].expand(len(probes[i]["choices"]), -1) for i in ids_per_rank[rank]]
    buckets = bucket_order([p["bucket"] for p in probes])
    return ProbeWork(probes=mine, prompts=prompts, choices=choices,
                     paths=torch.cat(paths) if paths else probe_set.paths[:0],
                     rounds=-(-max(pairs_per_rank) // micro), width=fixed_width(*probe_pairs(probes, tokenizer)),
                     buckets=buckets, counts=[sum(p["bucket"] == b for p in probes) for b in buckets])


def probe_hits_per_bucket(run, work: ProbeWork, variant: str, bar) -> list[float]:
    """This rank's right answers per bucket (`work.buckets`' order), one variant. Every rank must call it."""
    micro, device = run.cfg.train.micro_batch_size, run.info.device

    def forward(tokens: Tensor, paths: Tensor) -> Tensor:
        memory = None
        if variant != "none":  # every rank takes part in every fetch, padding-only batches too
            plan = run.bank.plan_lookup([(paths, np.full(len(paths), variant == "generic"))])
            memory = run.bank.fetch(plan, 0, requires_grad=False, padded_to=len(tokens))
        with run.precision.autocast():
            return run.engine.model(tokens, memory=memory)

    scores = choice_logprobs(forward, work.prompts, work.choices, work.paths, run.data.tokenizer.pad_id, device,
                             batch_size=micro, rows=micro, width=work.width, rounds=work.rounds, bar=bar)
    hits = probe_hits(work.probes, scores)
    return [float(sum(h for p, h in zip(work.probes, hits) if p["bucket"] == b)) for b in work.buckets]


def probe_record(work: ProbeWork, hits: list[float], prefix: str) -> dict[str, float]:
    """`prefix`/<bucket> (accuracy in [0, 1]) per bucket and `prefix`/all over every probe, from all ranks' hits."""
    record = {f"{prefix}/{metric_key(b)}": h / n for b, h, n in zip(work.buckets, hits, work.counts)}
    record[f"{prefix}/all"] = sum(hits) / sum(work.counts)
    return record
