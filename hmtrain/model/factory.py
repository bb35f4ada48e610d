"""Build the model a config trains: the anchor transformer (`model.family=lm`), an open-weight Hugging Face
anchor (`hf`) or a memory model."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hmtrain.config import Config, Family, ModelConfig
from hmtrain.model.hf_anchor import HFAnchor
from hmtrain.model.memory_model import MemoryModel
from hmtrain.model.sizes import run_model_config
from hmtrain.model.transformer import Transformer
from hmtrain.util.labels import IGNORE_INDEX

FAMILIES = Family.values()


def build_model(cfg: Config, model_cfg: Optional[ModelConfig] = None) -> nn.Module:
    """The module of `cfg` (on CPU, freshly initialised). For an LM, `model_cfg` is the run's model
    (`run_model_config`: the anchor, or the dense baseline); a memory model is sized by `cfg.memory_model`
    and needs `cfg.model.vocab_size` and `cfg.memory_model.pad_id` resolved from the prepared data. An anchor
    carries memory in the layers `memory.layers` names, the bank's layer slots in order."""
    if cfg.model.family == "memory_model":
        if cfg.model.vocab_size is None:
            raise ValueError("model.vocab_size is not resolved: a memory model takes it from the prepared data")
        return MemoryModel(cfg.memory_model, cfg.model.vocab_size)
    memory_layers = cfg.memory.decoder_layers(cfg.model.n_layers)  # the bank's layer slots, in order
    if cfg.model.family == "hf":
        return HFAnchor(cfg.model, max_seq_len=cfg.data.seq_len, memory_layers=memory_layers)
    if cfg.model.family != "lm":
        raise ValueError(f"config key 'model.family' must be one of {FAMILIES}, got {cfg.model.family!r}")
    model_cfg = model_cfg or run_model_config(cfg.model, cfg.train.mode, cfg.train.dense_multiplier)
    return Transformer(model_cfg, max_seq_len=cfg.data.seq_len, memory_layers=memory_layers)


def counted_targets(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> int:
    """Positions the model scores in one micro-batch (the loss normaliser's share): labels that are not
    -100 for an LM; the objective's own targets for a memory model, which builds them from the tokens."""
    count = getattr(model, "count_targets", None)
    if count is not None:
        return int(count(micro_batch["tokens"]))
    return int((micro_batch["labels"] != IGNORE_INDEX).sum())
