"""`hmtrain eval retention`: how much of its input window an embedding keeps (Badger 2026).

For each frozen encoder (hmtrain/retention/encoders.py) every window of `retention.n_ctx`
tokens becomes one vector. A fresh decoder (hmtrain/model/stacks.py: ProbeDecoder) is trained on
the training windows to emit the window's own tokens, unshifted, from the vector alone, expanded
over the window (repeat, or unrolled: position i reads a circular window of d/2 features starting
at feature i mod d). Reported on held-out windows:
  CE    cross-entropy per real token (padding ignored), in nats
  I_e   1 - CE / ln V: the entropy ratio, with ln V (a uniform guess over the tokenizer's V tokens)
        as the cross-entropy of an input that carries no information; 1 means the window comes back
        exactly, 0 means the vector helps no more than a uniform guess. A decoder also learns the
        tokens' marginal frequencies, so an uninformative vector scores above 0 (the untrained
        network is the control).
  acc   token accuracy: the share of real positions whose argmax is the window's token
Windows are cut from the prepared sequences (train split for the decoder, held-out split for the
scores), padding moved to the left so the last position is a real token.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from hmtrain.config import Config, flatten, to_yaml
from hmtrain.data.format.prepared import PreparedData
from hmtrain.eval.deep_routing import compare_deep_routing, render_deep_routing
from hmtrain.model.stacks import ProbeDecoder
from hmtrain.parallel.torch_engine import build_adamw
from hmtrain.retention.encoders import build_encoder, parse_spec
from hmtrain.retention.windows import encode_all, sample_windows, window_vectors
from hmtrain.train.metrics import JsonlLogger, MultiLogger
from hmtrain.train.mlflow_logger import MLflowLogger, default_store
from hmtrain.train.schedule import learning_rate
from hmtrain.util.files import write_text
from hmtrain.util.labels import IGNORE_INDEX

log = logging.getLogger(__name__)


def targets_of(windows: torch.Tensor, pad_id: int) -> torch.Tensor:
    return windows.masked_fill(windows == pad_id, IGNORE_INDEX)


def train_probe(cfg: Config, vectors: torch.Tensor, windows: torch.Tensor, *, expansion: str, vocab_size: int,
                pad_id: int, device: torch.device, log_fn=None) -> ProbeDecoder:
    """A fresh decoder trained to emit `windows` from `vectors` (seeded by retention.seed)."""
    r = cfg.retention
    torch.manual_seed(r.seed)
    decoder = ProbeDecoder(d_in=vectors.shape[1], vocab_size=vocab_size, n_ctx=r.n_ctx, expansion=expansion,
                           block=r.block, stack=r.decoder).to(device)
    optimizer = build_adamw(decoder, r.optim, device)
    generator = torch.Generator().manual_seed(r.seed)
    targets = targets_of(windows, pad_id)
    scale = vectors.pow(2).mean().sqrt().clamp(min=1e-6)  # one fixed scale: encoders' norms differ by orders
    decoder.train()
    for step in range(r.steps):
        pick = torch.randint(len(windows), (r.batch_size,), generator=generator)
        loss_sum, count = decoder((vectors[pick] / scale).to(device), targets[pick].to(device))
        loss = loss_sum / count.clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(r.optim, step, r.steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_fn is not None and ((step + 1) % 25 == 0 or step + 1 == r.steps):
            log_fn(step + 1, loss.item())
    decoder.eval()
    decoder.input_scale = float(scale)
    return decoder


@torch.no_grad()
def score_probe(decoder: ProbeDecoder, vectors: torch.Tensor, windows: torch.Tensor, pad_id: int,
                device: torch.device, batch_size: int = 256) -> dict[str, float]:
    totals = {"loss_sum": 0.0, "count": 0, "correct": 0}
    targets = targets_of(windows, pad_id)
    for i in range(0, len(windows), batch_size):
        part = decoder.score((vectors[i:i + batch_size] / decoder.input_scale).to(device),
                             targets[i:i + batch_size].to(device))
        totals = {k: totals[k] + part[k] for k in totals}
    return totals


def metrics(totals: dict, vocab_size: int) -> dict[str, float]:
    ce = totals["loss_sum"] / max(totals["count"], 1)
    return {"ce": ce, "entropy_ratio": 1.0 - ce / math.log(vocab_size), "token_accuracy":
            totals["correct"] / max(totals["count"], 1), "tokens": float(totals["count"])}


def deep_routing(cfg: Config, data: PreparedData, spec: str, *, shallow_levels: int, device: torch.device) -> dict:
    """The deep tree levels refitted and routed by the encoder `spec` (hmtrain/eval/deep_routing.py), a
    document's vector being the mean of its windows' vectors."""
    label, spec = parse_spec(spec)
    router = build_encoder(label, spec, cfg, data, device)
    pad_id = int(data.manifest["pad_id"])

    def vectors_of(token_lists: list[list[int]]) -> torch.Tensor:
        return window_vectors(router, token_lists, cfg.retention.n_ctx, pad_id)

    return compare_deep_routing(cfg, data, vectors_of, label=label, spec=spec, shallow_levels=shallow_levels,
                                device=device)


def run_retention(cfg: Config, specs: Sequence[str], out: Path, *, device: Optional[str] = None,
                  deep_router: Optional[str] = None, shallow_levels: int = 1,
                  console: Optional[Console] = None) -> dict:
    """Probe every encoder of `specs` with each expansion; write results.json / results.md / metrics.jsonl
    and an MLflow run in `out`; returns the results."""
    console = console or Console()
    if not specs and deep_router is None:
        raise ValueError("name at least one --encoder (router, anchor:PATH, memory:PATH, untrained:anchor, ...)")
    parsed = [parse_spec(s) for s in specs]
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--encoder labels must differ, got {labels}; name them as LABEL=SPEC")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: is a file, not a directory")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = PreparedData.open(cfg.data.prepared, verify="checksums" if cfg.data.verify_checksums else "sizes")
    r = cfg.retention
    encoders = [build_encoder(label, spec, cfg, data, device) for label, spec in parsed]  # fail before work
    vocab_size, pad_id = int(data.manifest["vocab_size"]), int(data.manifest["pad_id"])
    expansions = ["repeat", "unrolled"] if r.expansion == "both" else [r.expansion]
    train_windows = sample_windows(data, "train", r.n_ctx, r.train_windows, r.seed) if encoders else []
    heldout_windows = sample_windows(data, "heldout", r.n_ctx, r.heldout_windows, r.seed + 1) if encoders else []

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    jsonl = JsonlLogger(out / "metrics.jsonl")
    tracker = None
    if cfg.logging.mlflow:
        params = {k: v for k, v in flatten(cfg).items() if k.startswith(("retention.", "data."))}
        uri, artifacts_root = default_store(out)
        tracker = MLflowLogger(tracking_uri=cfg.logging.tracking_uri or uri,
                               experiment=cfg.logging.experiment,
                               run_name=cfg.logging.run_name or f"retention-{out.name}",
                               run_dir=out, artifact_dir=artifacts_root,
                               params={**params, **{f"encoder.{label}": spec for label, spec in parsed}})
    logger = MultiLogger(*(x for x in (jsonl, tracker) if x is not None))
    results = {"n_ctx": r.n_ctx, "vocab_size": vocab_size, "ln_V": math.log(vocab_size),
               "train_windows": len(train_windows), "heldout_windows": len(heldout_windows), "rows": []}
    status, offset = "FAILED", 0
    try:
        for encoder in encoders:
            started = time.perf_counter()
            train_vectors = encode_all(encoder, train_windows)
            heldout_vectors = encode_all(encoder, heldout_windows)
            for expansion in expansions:
                name = f"{encoder.label}.{expansion}"

                def log_fn(step: int, loss: float, name=name) -> None:
                    logger.log({f"{name}.train_ce": loss}, offset + step)

                decoder = train_probe(cfg, train_vectors, train_windows, expansion=expansion, vocab_size=vocab_size,
                                      pad_id=pad_id, device=device, log_fn=log_fn)
                scores = metrics(score_probe(decoder, heldout_vectors, heldout_windows, pad_id, device), vocab_size)
                offset += r.steps
                logger.log({f"{name}.{k}": v for k, v in scores.items()}, offset)
                row = {"encoder": encoder.label, "spec": encoder.spec, "dim": encoder.dim, "expansion": expansion,
                       "encoder_parameters": encoder.parameters, **scores,
                       "seconds": time.perf_counter() - started}
                results["rows"].append(row)
                console.print(f"{name}: CE {scores['ce']:.3f}, I_e {scores['entropy_ratio']:.3f}, "
                              f"acc {100 * scores['token_accuracy']:.1f}%")
        if deep_router is not None:
            results["deep_routing"] = deep_routing(cfg, data, deep_router, shallow_levels=shallow_levels,
                                                   device=device)
            levels = results["deep_routing"]["levels"]
            logger.log({f"deep_routing.level{entry['level']}.{key}": value for entry in levels
                        for key, value in entry.items() if key != "level"}, offset + 1)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.flush(offset + 1)
        jsonl.close()
        if tracker is not None:
            tracker.close(status=status)
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "results.md", to_markdown(results))
    if tracker is not None and tracker.enabled:
        for name in ("results.json", "results.md"):
            tracker.log_artifact(out / name)
    render(results, console)
    return results


def render(results: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    if results["rows"]:
        _render_rows(results, console)
    if "deep_routing" in results:
        render_deep_routing(results["deep_routing"], console)


def _render_rows(results: dict, console: Console) -> None:
    table = Table(title=f"information retention: {results['n_ctx']}-token windows, {results['heldout_windows']} "
                        "held-out")
    for column in ("encoder", "dim", "expansion", "CE", "I_e", "token acc"):
        table.add_column(column, justify="left" if column in ("encoder", "expansion") else "right")
    for row in results["rows"]:
        table.add_row(row["encoder"], str(row["dim"]), row["expansion"], f"{row['ce']:.3f}",
                      f"{row['entropy_ratio']:.3f}", f"{100 * row['token_accuracy']:.1f}%")
    console.print(table)
    console.print(f"I_e = 1 - CE / ln V, where ln V = {results['ln_V']:.3f} (V = {results['vocab_size']}) is the "
                  "cross-entropy of a uniform guess: an input that carries no information")


def to_markdown(results: dict) -> str:
    lines = []
    if results["rows"]:
        lines += [f"Windows of {results['n_ctx']} tokens; {results['train_windows']} train / "
                  f"{results['heldout_windows']} held-out; V = {results['vocab_size']}, ln V = {results['ln_V']:.3f}; "
                  "I_e = 1 - CE / ln V.", "", "| encoder | dim | expansion | CE | I_e | token acc |",
                  "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['encoder']} | {row['dim']} | {row['expansion']} | {row['ce']:.3f} | "
                     f"{row['entropy_ratio']:.3f} | {100 * row['token_accuracy']:.1f}% |")
    deep = results.get("deep_routing")
    if deep:
        probes = "probes" in deep
        lines += [f"Deep levels routed by {deep['encoder']} (levels 1..{deep['shallow_levels']} stay MiniLM), "
                      f"{deep['documents']} documents" + (f", {deep['probes']} probes" if probes else "") + ".", "",
                  "| level | ARI vs MiniLM | purity |"
                  + (" probe routing MiniLM | probe routing hybrid |" if probes else ""),
                  "|---|---|---|" + ("---|---|" if probes else "")]
        for e in deep["levels"]:
            cells = [str(e["level"]), f"{e['ari']:.3f}", f"{100 * e['purity']:.1f}%"]
            if probes:
                cells += [f"{100 * e['probe_routing_minilm']:.1f}%", f"{100 * e['probe_routing_hybrid']:.1f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
