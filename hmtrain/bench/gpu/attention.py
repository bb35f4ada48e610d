"""The GPU check's attention section: FlexAttention with the document BlockMask against SDPA with the
dense mask, through the model's own `attend` (hmtrain/model/attention.py).

Per shape (the paper's micro-batch x 2,048 tokens x heads x head_dim, bf16): the worst difference of
the outputs and of the q/k/v gradients, relative to SDPA's largest value; forward + backward time of
each; and how many graphs torch.compile made, first for one batch, then for batches with other
document layouts and for a micro-batch whose last rows are padding (owner placement pads a rank's
short share to the micro-batch size) a run also sees: one compile per shape is the goal, a recompile
per batch would be a bug. On CPU (--smoke) FlexAttention
has no backward and is not compiled, so only the forward outputs are compared.
"""
from __future__ import annotations

import time

import torch

from hmtrain.bench.attention import packed_segments, timed
from hmtrain.model.attention import attend, build_mask

GPU_SHAPES = {"160m": (16, 12, 2048, 32), "1.4b": (4, 16, 2048, 128)}  # micro-batch, heads, seq_len, head_dim
SMOKE_SHAPES = {"tiny": (2, 2, 128, 16)}


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    scale = ref.float().abs().max().clamp_min(1e-6)
    return ((got.float() - ref.float()).abs().max() / scale).item()


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compare_shape(shape: tuple[int, int, int, int], device: str, dtype: torch.dtype, train: bool) -> dict:
    B, H, T, hd = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, hd, generator=gen).to(device, dtype).requires_grad_(train) for _ in range(3))
    segments = packed_segments(B, T, mean_doc=512 if T >= 1024 else 32, device=device)
    dy = torch.randn(B, H, T, hd, generator=gen).to(device, dtype)
    outputs = {}
    with torch.set_grad_enabled(train):
        for impl in ("sdpa", "flex"):
            started = time.perf_counter()
            y = attend(q, k, v, build_mask(segments, impl))
            grads = torch.autograd.grad(y, (q, k, v), dy) if train else ()
            outputs[impl] = (y, *grads)
            if device == "cuda":
                torch.cuda.synchronize()
            if impl == "flex":
                first_call_s = time.perf_counter() - started
    entry = {"output_error": relative_error(outputs["sdpa"][0], outputs["flex"][0]),
             "documents_per_row": float(segments[:, -1].float().mean() + 1), "first_flex_call_s": first_call_s}
    if train:
        entry["grad_error"] = max(relative_error(a, b) for a, b in zip(outputs["sdpa"][1:], outputs["flex"][1:]))
    for impl in ("sdpa", "flex"):
        def step(impl=impl):
            y = attend(q, k, v, build_mask(segments, impl))
            return torch.autograd.grad(y, (q, k, v), dy) if train else y

        with torch.set_grad_enabled(train):
            entry[f"{impl}_ms"] = timed(step, device, iters=3 if device == "cpu" else 20)
    entry["flex_vs_sdpa"] = entry["sdpa_ms"] / entry["flex_ms"]
    if device == "cuda":
        entry["graphs"] = count_recompiles(q, k, v, dy, B, T, device)
    return entry


def count_recompiles(q, k, v, dy, B: int, T: int, device: str) -> dict:
    """Graphs compiled by three more batches of other document layouts, then by a padded micro-batch."""
    before = graphs_compiled()
    for seed in (1, 2, 3):
        gen = torch.Generator().manual_seed(seed)
        starts = torch.rand(B, T, generator=gen) < 1.0 / 300
        starts[:, 0] = False
        segments = starts.long().cumsum(dim=1).to(device)
        torch.autograd.grad(attend(q, k, v, build_mask(segments, "flex")), (q, k, v), dy)
    layouts = graphs_compiled() - before
    padded = segments.clone()
    padded[B // 2:] = 0  # padding rows: one segment of padding each (hmtrain/data/loading/batch.py pad_batch)
    torch.autograd.grad(attend(q, k, v, build_mask(padded, "flex")), (q, k, v), dy)
    return {"new_layouts": layouts, "padding_batch": graphs_compiled() - before - layouts}


def compare_attention(run) -> None:
    cuda = torch.cuda.is_available() and not run.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = GPU_SHAPES if cuda else SMOKE_SHAPES
    found = {}
    for name, shape in shapes.items():
        found[name] = {"shape": dict(zip(("batch", "heads", "seq_len", "head_dim"), shape)),
                       **compare_shape(shape, device, dtype, train=cuda)}
        run.put("shapes", found)
    parts = []
    for name, e in found.items():
        grads = f", grads {e['grad_error']:.1e}" if "grad_error" in e else " (forward only on CPU)"
        graphs = (f", recompiles: {e['graphs']['new_layouts']} for new layouts, {e['graphs']['padding_batch']} for "
                  "the padding batch" if "graphs" in e else "")
        parts.append(f"{name}: flex vs sdpa err {e['output_error']:.1e}{grads}, {e['flex_vs_sdpa']:.3g}x sdpa's speed"
                     f"{graphs}")
    run.put("summary", "; ".join(parts))
