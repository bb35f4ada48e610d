"""Validation during training (`train.eval_every`): held-out loss and perplexity at the weights of a step.

The held-out split's first `train.eval_sequences` sequences (all when 0), in id order, are cut into
micro-batches of `train.micro_batch_size`; under W ranks rank r scores batches r, r + W, ... (owner
placement: the sequences of the subtrees it owns, whose rows only it holds). Every rank
runs the same number of rounds, padding with rows that score nothing (hmtrain/data/loading/batch.py), because
each forward is a collective: the bank's id exchange and row fetch, FSDP's parameter all-gathers. One
all-reduce sums the loss and token counts at the end, so the result does not depend on the world size, and
equals `hmtrain eval`'s held-out numbers of the step's checkpoint (hmtrain/eval/scoring.py, which reads a
checkpoint on one process; train cannot import eval, docs/design.md "Parts").

Memory as in training: none in anchor pretraining, each sequence's fetched path in the memory phase
(`val/loss`, `val/ppl`); `train.eval_variants` adds the generic memory and the anchor alone. With
`train.eval_probes`, each variant also scores the same bucket-balanced probe subset (`val/probe_acc/<bucket>`,
`val/probe_acc/all`, hmtrain/train/probe_validation.py), in the same rounds and all-reduce. Fetches plan
with `MemoryBank.plan_lookup` and no gradients, so the bank's step state and the model are untouched:
training goes on bit for bit as without validation.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from hmtrain.config import ConfigError
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.batch import pad_batch, real_rows
from hmtrain.data.routing.questions import ProbeSet
from hmtrain.model import counted_targets
from hmtrain.parallel.parallelize import reshard_after_inference
from hmtrain.train.build import Parts
from hmtrain.train.probe_validation import probe_hits_per_bucket, probe_record, probe_work

HELDOUT = "heldout"
# variant -> metric suffix; "fetched" is the memory the memory phase trains with
SUFFIX = {"fetched": "", "generic": "_generic", "none": "_anchor"}


def check_heldout(data: PreparedData, eval_every: int) -> None:
    """Before anything is written: validation needs held-out sequences to score."""
    if eval_every and len(data.sequences(HELDOUT)) == 0:
        raise ConfigError(f"config key 'train.eval_every': {eval_every} asks for validation, but {data.root} holds "
                          "no held-out sequences; prepare the data with a held-out split, or set train.eval_every=0")


def this_ranks_ids(level1_of: Callable[[np.ndarray], np.ndarray], count: int, micro: int, rank: int, world: int,
                   owner_of_subtree: np.ndarray | None, group_size: int = 1) -> list[np.ndarray]:
    """Ids (of held-out sequences, or probes) of this rank's micro-batches, as many on every rank; an empty
    array where this rank has none left. Gather placement: batch b holds ids b*micro..., rank r takes batches
    r, r + W, ... Owner placement (the bank keeps a subtree's rows in its group of `group_size` ranks alone):
    a group takes the ids of its subtrees (`level1_of(ids)`: their level-1 nodes), in order, and its rank i
    the i-th of R near-equal parts of them (R = 1: all)."""
    ids = np.arange(count)
    if owner_of_subtree is None:
        batches = [ids[lo:lo + micro] for lo in range(0, count, micro)]
        rounds = -(-len(batches) // world)
        return [batches[b] if b < len(batches) else ids[:0] for b in range(rank, rounds * world, world)]
    groups = np.asarray(owner_of_subtree)[level1_of(ids)] if count else ids
    busiest = -(-int(np.bincount(groups, minlength=world // group_size).max(initial=0)) // group_size)
    rounds = -(-busiest // micro)
    mine = np.array_split(ids[groups == rank // group_size], group_size)[rank % group_size]
    return [mine[i * micro:(i + 1) * micro] for i in range(rounds)]


def variants(run: Parts, memory_phase: bool) -> list[str]:
    if not memory_phase:
        return ["none"]
    if not run.cfg.train.eval_variants:
        return ["fetched"]
    return ["fetched", *(["generic"] if run.bank.has_generic else []), "none"]


def probe_ids_per_rank(run: Parts, probes: ProbeSet) -> list[np.ndarray]:
    """The probes each rank scores, as held-out sequences are split: owner placement sends a probe to the group
    that owns the subtree its question routes to."""
    level1 = probes.paths[:, 0].numpy()
    world = run.info.dp_size  # a tensor-parallel group scores the same probes
    return [np.concatenate([np.zeros(0, dtype=np.int64), *this_ranks_ids(
        lambda ids: level1[ids], len(level1), run.cfg.train.micro_batch_size, rank, world, run.owner_of_subtree,
        run.group_size)]) for rank in range(world)]


@torch.no_grad()
def validate(run: Parts, memory_phase: bool, probes: Optional[ProbeSet] = None) -> dict[str, float]:
    """Held-out metrics at the current weights, and probe accuracy when `probes` (`validation_probes`) are
    given; the same on every rank (every rank must call it)."""
    tc, info = run.cfg.train, run.info
    started = time.perf_counter()
    sequences = run.data.sequences(HELDOUT)
    count = min(tc.eval_sequences, len(sequences)) if tc.eval_sequences else len(sequences)
    batches = this_ranks_ids(sequences.level1, count, tc.micro_batch_size, info.dp_rank, info.dp_size,
                             run.owner_of_subtree, run.group_size)
    names = variants(run, memory_phase)
    work = probe_work(probes, run.data.tokenizer, probe_ids_per_rank(run, probes), info.dp_rank,
                      tc.micro_batch_size) if probes is not None else None
    bar = tqdm(total=(len(batches) + (work.rounds if work else 0)) * len(names), desc="validation", leave=False,
               dynamic_ncols=True, disable=not (tc.progress and info.is_main))
    sums, hits = [], []
    for variant in names:
        sums += _score(run, sequences, batches, variant if memory_phase else "none", bar)
        if work is not None:
            hits += probe_hits_per_bucket(run, work, variant if memory_phase else "none", bar)
    bar.close()
    reshard_after_inference(run.model)
    counted = sums + hits if info.counts_data else [0.0] * len(sums + hits)  # a tensor-parallel group's once
    totals = run.comm.all_reduce_(torch.tensor(counted, dtype=torch.float64, device=run.comm.device)).tolist()
    record = {}
    for k, variant in enumerate(names):
        loss = totals[2 * k] / max(totals[2 * k + 1], 1)
        suffix = SUFFIX[variant] if memory_phase else ""
        if not suffix:
            record["val/loss"] = loss
        record[f"val/ppl{suffix}"] = math.exp(loss)
        if work is not None:
            per_variant = len(work.buckets)
            start = len(sums) + k * per_variant
            record.update(probe_record(work, totals[start:start + per_variant], f"val/probe_acc{suffix}"))
    record["val/tokens"] = totals[1]
    record["val/seconds"] = time.perf_counter() - started
    return record


def _score(run: Parts, sequences, batches: list[np.ndarray], variant: str, bar) -> list[float]:
    """[summed token loss, scored tokens] of this rank's batches, one variant."""
    micro, device = run.cfg.train.micro_batch_size, run.info.device
    loss_sum, tokens = torch.zeros((), device=device, dtype=torch.float64), 0
    for ids in batches:
        mb = pad_batch(sequences.batch(ids), micro, sequences.pad_id)  # one shape: compiled attention
        tokens += counted_targets(run.model, mb)
        memory = None
        if variant != "none":  # every rank takes part in every fetch, padding-only batches too
            n = real_rows(mb)
            plan = run.bank.plan_lookup([(mb["paths"][:n], np.full(n, variant == "generic"))])
            memory = run.bank.fetch(plan, 0, requires_grad=False, padded_to=micro)
        mb = {key: value.to(device, non_blocking=True) for key, value in mb.items()}
        with run.precision.autocast():
            loss, _ = run.engine.model(mb["tokens"], segments=mb["segments"], memory=memory, labels=mb["labels"])
        loss_sum += loss.double()
        bar.update(1)
    return [float(loss_sum), float(tokens)]
