"""The shape of an open-weight Hugging Face causal LM (`model.family=hf`), read from its config.json alone.

Everything that sizes a run from the config (the bank's rows, `hmtrain info`, the loss normaliser's
vocabulary) needs the model's hidden size, depth and vocabulary before any weight is loaded, and
`hmtrain info` must count the paper's Table 2 models from a hand-written config.json, without their
weights. So the config layer reads the few keys it needs here, and `load_config` writes them into the
`model` section (`resolve_hf_model`): the rest of hmtrain sees an HF anchor as a `ModelConfig` like its
own. The weights are read only by hmtrain/model/hf_anchor.py, with `transformers`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hmtrain.config.checks import ConfigError

CONFIG_FILE = "config.json"
# model_type -> whether its MLP is gated (gate/up/down: three slots per memory unit) or not (GPT-2's c_fc/c_proj: two)
ARCHITECTURES = {"llama": True, "qwen2": True, "qwen3": True, "gemma3_text": True, "gpt2": False}


@dataclass(frozen=True)
class HFShape:
    model_type: str
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    tie_embeddings: bool
    gated: bool  # gate/up/down MLP; False: GPT-2's ungated c_fc/c_proj
    eos_token_id: int | None
    pad_token_id: int | None


def _first(value):
    return value[0] if isinstance(value, list) and value else value


@lru_cache(maxsize=16)
def _read(path: str, mtime_ns: int) -> HFShape:
    file = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config key 'model.hf_path': {file} is not a readable JSON file ({exc})") from exc
    if raw.get("model_type") == "gemma3" and isinstance(raw.get("text_config"), dict):
        raw = {**raw["text_config"], "model_type": "gemma3_text"}  # the multimodal wrapper's language model
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"config key 'model.hf_path': {file} has model_type {model_type!r}; hmtrain supports "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    try:
        if model_type == "gpt2":
            d, heads = int(raw["n_embd"]), int(raw["n_head"])
            shape = dict(d_model=d, n_layers=int(raw["n_layer"]), n_heads=heads, head_dim=d // heads,
                         ffn_hidden=int(raw.get("n_inner") or 4 * d))
        else:
            d, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            shape = dict(d_model=d, n_layers=int(raw["num_hidden_layers"]), n_heads=heads,
                         head_dim=int(raw.get("head_dim") or d // heads), ffn_hidden=int(raw["intermediate_size"]))
        vocab = int(raw["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'model.hf_path': {file} lacks a usable {exc} for a {model_type} model") from exc
    return HFShape(model_type=model_type, vocab_size=vocab, tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
                   gated=ARCHITECTURES[model_type], eos_token_id=_first(raw.get("eos_token_id")),
                   pad_token_id=_first(raw.get("pad_token_id")), **shape)


def hf_shape(path: str | Path) -> HFShape:
    """The shape of the HF model in directory `path` (a one-line ConfigError naming it when unreadable)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"config key 'model.hf_path': {directory} is not a local directory (hmtrain never "
                          "downloads: give a directory `save_pretrained` wrote)")
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"config key 'model.hf_path': {directory} has no {CONFIG_FILE}")
    return _read(str(directory.resolve()), file.stat().st_mtime_ns)


def resolve_hf_model(model) -> None:
    """Fill a `ModelConfig` of family hf with the shape of its `hf_path` (what config.json says wins)."""
    shape = hf_shape(model.hf_path)
    for key in ("d_model", "n_layers", "n_heads", "head_dim", "ffn_hidden", "vocab_size", "tie_embeddings"):
        setattr(model, key, getattr(shape, key))
