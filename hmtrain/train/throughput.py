"""Step metrics that need arithmetic or every rank: model FLOPs, MFU, per-rank sums and imbalance.

MFU = model FLOPs per second / the device's peak. Model FLOPs per token, training: 6 x (anchor
parameters without the embedding lookup + fetched memory parameters) + 12 x layers x heads x
head_dim x seq_len for attention (the usual full-causal count; document masking skips part of it, so
MFU slightly overstates work on short documents). Peaks are dense bf16 tensor-core numbers from the
vendors' data sheets; a device not in the table gets no MFU rather than a made-up one.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from hmtrain.config import ModelConfig
from hmtrain.memory.exchange import Comm

PEAK_BF16_FLOPS = {  # substring of torch.cuda.get_device_name() -> dense bf16 FLOP/s
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


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
