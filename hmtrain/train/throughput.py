"""Step metrics that need arithmetic or every rank: model FLOPs, MFU, per-rank sums and imbalance.

MFU = model FLOPs per second / the device's peak. Model FLOPs per token, training: 6 x (anchor
parameters without the embedding lookup + fetched memory parameters) + 12 x layers x heads x
head_dim x seq_len for attention (the usual full-causal count; document masking skips part of it, so
MFU slightly overstates work on short documents). Peaks are dense bf16 tensor-core numbers from the
vendors' data sheets; a device not in the table gets no MFU rather than a made-up one, and a warning
naming it. On CUDA every logged step also carries the accelerator's memory over the window, the maximum
over ranks (`gpu/*`, as torchtitan's memory monitor): peak active and reserved GiB, and the OOMs and
allocation retries (cudaMalloc failed, cache flushed, tried again: a sign of fragmentation) since the start.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch

from hmtrain.config import ModelConfig
from hmtrain.memory.exchange import Comm
from hmtrain.train.recipe import MEMORY

log = logging.getLogger(__name__)

PEAK_BF16_FLOPS = {  # substring of torch.cuda.get_device_name() -> dense bf16 FLOP/s (no sparsity)
    "B200": 2250e12,
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "MI300X": 1307e12,  # ROCm reports "AMD Instinct MI300X"
    "L40S": 362e12,
    "A10G": 125e12,
}
GiB = 2**30


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_for(torch.cuda.get_device_name(device))


def peak_for(name: str) -> float | None:
    """The dense bf16 peak of a device by its name; None (and a warning) for one not in the table."""
    if "H100" in name and "PCIe" in name:
        return 756e12
    peak = next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        log.warning("MFU: unknown device %r (not in PEAK_BF16_FLOPS, hmtrain/train/throughput.py); "
                    "steps are logged without mfu", name)
    return peak


def device_memory(device: torch.device) -> dict[str, float]:
    """This rank's accelerator memory since the last call (peaks reset), or {} off CUDA."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {"gpu/max_active_gib": stats.get("active_bytes.all.peak", 0) / GiB,
            "gpu/max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GiB,
            "gpu/num_ooms": float(stats.get("num_ooms", 0)),
            "gpu/num_alloc_retries": float(stats.get("num_alloc_retries", 0))}


def max_over_ranks(comm: Comm, local: Mapping[str, float]) -> dict[str, float]:
    keys = sorted(local)
    if not keys:
        return {}
    values = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=comm.device)
    comm.all_reduce_(values, op=torch.distributed.ReduceOp.MAX)
    return dict(zip(keys, values.tolist()))


def train_flops_per_token(model: ModelConfig, seq_len: int, fetched_params: int) -> float:
    inner = model.n_heads * model.head_dim
    per_layer = 4 * model.d_model * inner + 3 * model.d_model * model.ffn_hidden
    head = model.vocab_size * model.d_model
    dense = model.n_layers * per_layer + head + fetched_params
    attention = 12 * model.n_layers * inner * seq_len
    return 6.0 * dense + attention


def reduce_over_ranks(comm: Comm, local: Mapping[str, float]) -> dict[str, float]:
    """Per key: the sum over ranks, and `<key>/imbalance` = max / mean (one all-reduce each, small)."""
    keys = sorted(local)
    if not keys:
        return {}
    values = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=comm.device)
    maxima = values.clone()
    comm.all_reduce_(values)
    comm.all_reduce_(maxima, op=torch.distributed.ReduceOp.MAX)
    out = {}
    for key, total, top in zip(keys, values.tolist(), maxima.tolist()):
        out[key] = total
        mean = total / comm.world_size
        if comm.world_size > 1:
            out[f"{key}/imbalance"] = top / mean if mean > 0 else 1.0
    return out


@dataclass
class Window:
    """What the steps since the last logged one did: their tokens, fetch time and wall time."""

    started: float = field(default_factory=time.perf_counter)
    tokens: float = 0.0
    fetch_s: float = 0.0
    steps: int = 0


@dataclass
class StepResult:
    """One optimizer step's numbers, on this rank, for its metrics."""

    loss_sum: torch.Tensor  # the summed token losses of this rank's micro-batches (a device scalar)
    global_tokens: int  # scored tokens of the whole global batch
    labels_local: int  # scored tokens on this rank
    grad_norm: torch.Tensor
    plan: object = None  # the bank's step plan (memory phase only)
    generic_used: int = 0  # sequences that used the generic memory
    device: torch.device = torch.device("cpu")  # where the step ran (its memory is logged on CUDA)


def step_record(comm: Comm, now, result: StepResult, window: Window, flops_per_token: float,
                peak: Optional[float]) -> dict[str, float]:
    """The step's metrics, aggregated over ranks (the one host sync of a logged step)."""
    loss = float(comm.all_reduce_(result.loss_sum.to(comm.device))) / max(result.global_tokens, 1)
    elapsed = max(time.perf_counter() - window.started, 1e-9)
    record = {"loss": loss, "lr/anchor": now.anchor_lr, "lr/memory": now.memory_lr,
              "grad_norm": float(result.grad_norm), "tokens_per_s": window.tokens / elapsed,
              "step_s": elapsed / max(window.steps, 1),
              "phase": float(now.phase == MEMORY), "global_batch": float(now.global_batch)}
    if peak:
        record["mfu"] = window.tokens * flops_per_token / elapsed / (peak * comm.world_size)
    record.update(max_over_ranks(comm, device_memory(result.device)))
    plan = result.plan
    if plan is not None:
        local = {**plan.stats, "fetch_s": window.fetch_s, "tokens": float(result.labels_local),
                 "sequences": float(sum(plan.batch_sizes)), "generic_sequences": float(result.generic_used)}
        for key, value in reduce_over_ranks(comm, local).items():
            record[f"memory/{key}"] = value
    odd = {k: v for k, v in record.items() if not math.isfinite(v) and k not in ("loss", "grad_norm")}
    if odd:  # (a non-finite loss or gradient norm stops the run: hmtrain/train/divergence.py)
        log.warning("non-finite metrics at this step: %s", odd)
    return record
