"""Document-causal attention: SDPA with a dense mask vs FlexAttention with a BlockMask.

    python -m hmtrain.bench.attention                      # CPU, forward only
    python -m hmtrain.bench.attention --device cuda --batch 8 --seq-len 2048 --heads 12 --head-dim 32

Each row times one attention call over a packed batch (several documents per row, the same
seeded segments for every row of the table), including building its mask. On CPU only the
forward runs: torch's FlexAttention has no CPU backward. On CUDA forward + backward is timed with
CUDA events. `flex compiled` is what `model.attention=auto` runs on CUDA; its first call
(compilation) is reported separately. Also checks each output against `sdpa dense mask`.
"""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from hmtrain.bench.memory_ffn import median_ms
from hmtrain.model.attention import document_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def packed_segments(batch: int, seq_len: int, mean_doc: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    starts = torch.rand(batch, seq_len, generator=gen) < 1.0 / mean_doc
    starts[:, 0] = False
    return starts.long().cumsum(dim=1).to(device)


def timed(fn: Callable[[], object], device: str, iters: int) -> float:
    """Median ms of `fn` after one untimed run (CUDA events on a GPU), as the memory-FFN benchmark times."""
    return median_ms(fn, device, warmup=1, iters=iters)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hmtrain bench attention", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--mean-doc", type=int, default=64, help="mean document length in tokens")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    dev, train = args.device, args.device.startswith("cuda")
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dev, DTYPES[args.dtype]).requires_grad_(train) for _ in range(3))
    segments = packed_segments(args.batch, args.seq_len, args.mean_doc, dev)
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    compiled_create = torch.compile(create_block_mask)
    B, T = segments.shape

    def same_document_causal(b, h, q_idx, kv_idx):  # as hmtrain.model.attention.document_block_mask
        return (q_idx >= kv_idx) & (segments[b, q_idx] == segments[b, kv_idx])

    rows: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa dense mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(segments)),
        "sdpa causal only": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "flex eager": lambda: flex_attention(
            q, k, v, block_mask=create_block_mask(same_document_causal, B, None, T, T, device=dev)),
        "flex compiled": lambda: compiled_flex(
            q, k, v, block_mask=compiled_create(same_document_causal, B, None, T, T, device=dev)),
    }
    reference = rows["sdpa dense mask"]().detach().float()
    print(f"device {dev}, q/k/v {list(shape)} {args.dtype}, {int(segments[:, -1].float().mean()) + 1} documents "
          f"per row, {'forward + backward' if train else 'forward only (no CPU backward in FlexAttention)'}")
    print(f"{'path':<18}{'ms':>10}{'x sdpa dense':>14}{'max err':>10}{'first call s':>14}")
    base = None
    for name, fn in rows.items():
        step = (lambda fn=fn: fn().float().sum().backward()) if train else fn
        with warnings.catch_warnings(), torch.set_grad_enabled(train):
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            out = fn()
            first = time.perf_counter() - t0
            err = (out.detach().float() - reference).abs().max().item() if name != "sdpa causal only" else float("nan")
            ms = timed(step, dev, args.iters)
        base = base or ms
        print(f"{name:<18}{ms:>10.2f}{ms / base:>14.2f}{err:>10.1e}{first:>14.1f}")


if __name__ == "__main__":
    main()
