"""The frozen encoders the retention probe measures: one vector per window of tokens.

Specs (`hmtrain eval retention --encoder SPEC`, repeatable; `label=SPEC` names a row):
  router            the data's routing embedder (all-MiniLM-L6-v2, or `hashing` in tests) on the
                    window's text; `router:minilm` / `router:hashing` pick one explicitly
  anchor:PATH       a trained anchor (LM checkpoint or run directory): the state of layer
                    `retention.anchor_layer` (-1: after the final norm) at `retention.anchor_position`
                    (last real token, or the mean over real tokens); `anchor:PATH@layer=1,position=mean`
                    overrides both for this encoder (also for untrained:anchor)
  memory:PATH       the encoder of a memory model or autoencoder checkpoint: its memory vector
  untrained:anchor  a freshly initialised anchor of the config's `model` shape (the paper's control)
  untrained:memory  a freshly initialised memory-model encoder of the config's `memory_model` shape

Windows arrive left-padded (the last position is always a real token). The anchor reads them with
the padding as a separate document, so attention and RoPE see only the real tokens; a memory-model
encoder reads the whole window, left padding included, as the paper's probe does; it was trained on
packed chunks without padding, so only the held-out windows shorter than n_ctx (the tail of a
document) are padded and out of its training distribution.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from hmtrain.checkpoint.resume import check_data_fingerprints
from hmtrain.config import Config
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.embed import build_embedder, embed_texts
from hmtrain.eval.loading import load_trained
from hmtrain.model import MemoryModel, Transformer, run_model_config

KINDS = ("router", "anchor", "memory", "untrained")


@dataclass
class Encoder:
    label: str
    spec: str
    dim: int
    encode: Callable[[Tensor], Tensor]  # [N, n_ctx] left-padded token ids -> [N, dim]
    parameters: int = 0


def default_label(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind in ("anchor", "memory") and rest:
        name = [p for p in re.split(r"[\\/]", rest.rstrip("/")) if p and not p.startswith(("step_", "checkpoints"))]
        return f"{kind}-{name[-1]}" if name else kind
    return spec.replace(":", "-")


def parse_spec(text: str) -> tuple[str, str]:
    """`[label=]spec` -> (label, spec); the label may only hold [A-Za-z0-9_.-] (MLflow metric names). Text
    before the first `=` is a label only if it holds no `:`, so `anchor:PATH@layer=0` is a spec alone."""
    label, sep, spec = text.partition("=")
    if not sep or ":" in label:
        label, spec = "", text
    kind = spec.partition(":")[0]
    if kind not in KINDS:
        raise ValueError(f"--encoder {text!r}: unknown kind {kind!r}; expected router[:NAME], anchor:PATH, "
                         "memory:PATH, untrained:anchor or untrained:memory")
    if kind in ("anchor", "memory") and not spec.partition(":")[2]:
        raise ValueError(f"--encoder {text!r}: {kind} needs a checkpoint, e.g. {kind}:runs/NAME")
    if kind == "untrained" and spec.partition("@")[0] not in ("untrained:anchor", "untrained:memory"):
        raise ValueError(f"--encoder {text!r}: expected untrained:anchor or untrained:memory")
    label = label or default_label(spec)
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    return label, spec


def _resolved_vocab(cfg: Config, data: PreparedData) -> int:
    vocab = int(data.manifest["vocab_size"])
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    return -(-vocab // cfg.model.vocab_multiple) * cfg.model.vocab_multiple


def _anchor_encoder(model: Transformer, layer: int, position: str, pad_id: int, device) -> Callable[[Tensor], Tensor]:
    n_layers = len(model.layers)
    if not -1 <= layer < n_layers:
        raise ValueError(f"retention.anchor_layer {layer} is out of range for an anchor of {n_layers} layers "
                         f"(0..{n_layers - 1}, or -1 for the final norm's output)")
    captured: dict[str, Tensor] = {}

    def hook(_module, _inputs, output):
        captured["h"] = output

    @torch.no_grad()
    def encode(windows: Tensor) -> Tensor:
        windows = windows.to(device)
        real = windows != pad_id
        segments = real.long()  # the left padding is a document of its own: never attended to
        if layer == -1:
            states = model.hidden_states(windows, segments=segments)
        else:
            handle = model.layers[layer].register_forward_hook(hook)
            try:
                model.hidden_states(windows, segments=segments)
            finally:
                handle.remove()
            states = captured.pop("h")
        if position == "last":
            return states[:, -1].float().cpu()
        weights = real.float()[..., None]
        return ((states.float() * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu()

    return encode


def _memory_encoder(model: MemoryModel, n_ctx: int, device) -> Callable[[Tensor], Tensor]:
    if not model.has_encoder:
        raise ValueError(f"this memory model (context={model.context!r}) has no encoder to probe")
    if n_ctx > model.n_ctx:
        raise ValueError(f"retention.n_ctx {n_ctx} is longer than the memory model's chunks "
                         f"(memory_model.n_ctx {model.n_ctx}); its encoder cannot read such windows")

    @torch.no_grad()
    def encode(windows: Tensor) -> Tensor:
        return model.encode(windows.to(device)).float().cpu()

    return encode


def _router_encoder(name: str, data: PreparedData, device) -> tuple[Callable[[Tensor], Tensor], int]:
    embedder = build_embedder(name, device=str(device))
    tokenizer = data.tokenizer
    drop = {tokenizer.pad_id, tokenizer.eot_id}

    def encode(windows: Tensor) -> Tensor:
        texts = [tokenizer.decode([t for t in row if t not in drop]) for row in windows.tolist()]
        return embed_texts(embedder, texts, batch_size=64, progress=False)

    return encode, embedder.dim


def anchor_options(spec: str, layer: int, position: str) -> tuple[str, int, str]:
    """Split `anchor:PATH@layer=L,position=P` into (anchor:PATH, L, P); absent options keep the defaults."""
    spec, sep, options = spec.rpartition("@") if "@" in spec else (spec, "", "")
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key == "layer" and value.lstrip("-").isdigit():
            layer = int(value)
        elif key == "position" and value in ("last", "mean"):
            position = value
        else:
            raise ValueError(f"--encoder {spec}@{options}: unknown option {item!r}; expected layer=INT or "
                             "position=last|mean")
    return spec, layer, position


def build_encoder(label: str, spec: str, cfg: Config, data: PreparedData, device: torch.device) -> Encoder:
    """The frozen encoder a spec names (see the module docstring), checked against the prepared data."""
    r = cfg.retention
    layer, position = r.anchor_layer, r.anchor_position
    if spec.startswith(("anchor:", "untrained:anchor")):
        spec, layer, position = anchor_options(spec, layer, position)
    kind, _, rest = spec.partition(":")
    pad_id = int(data.manifest["pad_id"])
    if kind == "router":
        encode, dim = _router_encoder(rest or data.manifest["embedder"], data, device)
        return Encoder(label, spec, dim, encode)
    if spec == "untrained:anchor":
        torch.manual_seed(r.seed)
        model_cfg = dataclasses.replace(run_model_config(cfg.model, "hierarchical", 1.0),
                                        vocab_size=_resolved_vocab(cfg, data))
        model = Transformer(model_cfg, max_seq_len=max(r.n_ctx, cfg.data.seq_len)).to(device).eval()
        return Encoder(label, spec, model_cfg.d_model, _anchor_encoder(model, layer, position, pad_id, device),
                       _count(model))
    if spec == "untrained:memory":
        torch.manual_seed(r.seed)
        mm = dataclasses.replace(cfg.memory_model, pad_id=pad_id, context="memory")
        model = MemoryModel(mm, _resolved_vocab(cfg, data)).to(device).eval()
        return Encoder(label, spec, mm.encoder.d_model, _memory_encoder(model, r.n_ctx, device),
                       _count(model, "encoder"))
    if kind == "anchor":
        from hmtrain.eval.memory_eval import checkpoint_family

        if checkpoint_family(rest) != "lm":  # before loading it as an anchor, which would fail less clearly
            raise ValueError(f"--encoder {spec}: {rest} is a memory model; use memory:{rest}")
        trained = load_trained(rest, device)
        _check_data(trained.path, trained.record, trained.cfg, data)
        model = trained.model
        return Encoder(label, spec, model.cfg.d_model, _anchor_encoder(model, layer, position, pad_id, device),
                       _count(model))
    from hmtrain.eval.memory_eval import load_memory_model

    loaded = load_memory_model(rest, device)
    _check_data(loaded.path, loaded.record, loaded.cfg, data)
    return Encoder(label, spec, loaded.cfg.memory_model.encoder.d_model,
                   _memory_encoder(loaded.model, r.n_ctx, device), _count(loaded.model, "encoder"))


def _count(model, part: str = "") -> int:
    if part:
        return sum(p.numel() for _, p in model.parameters_of(part))
    return sum(p.numel() for p in model.parameters())


def _check_data(path, record: dict, trained_cfg: Config, data: PreparedData) -> None:
    """The encoder must have been trained on this tokenizer (the tree does not matter here)."""
    check_data_fingerprints(path, {**record, "data_fingerprints": {
        k: v for k, v in record.get("data_fingerprints", {}).items() if k == "tokenizer"}}, data.fingerprints(),
        data.root)
