"""An open-weight Hugging Face causal LM as the anchor (`model.family=hf`), with memory in its MLPs.

The model is read with `transformers` from a local directory as `save_pretrained` writes it
(`local_files_only`: nothing is downloaded). Supported: Llama, Qwen2, Qwen3 and Gemma 3 (gated MLPs,
gate/up/down) and GPT-2 (ungated c_fc/c_proj); hmtrain/config/hf.py reads their shapes.

Each decoder layer's MLP gets the fetched units as hmtrain's own FFN does (docs/design.md, "The
memory, exactly"): a forward hook on the MLP adds, for sequence b,
    gated:    act(x U_gate_b^T) * (x U_up_b^T) U_down_b       (SwiGLUUnits: three slots a unit)
    ungated:  act(x U_up_b^T) U_down_b                        (UngatedUnits, GPT-2: two slots)
to the MLP's own output, with the MLP's own activation module (`act_fn`; GPT-2's `act`): the
concatenation of the anchor's hidden units and the memory's. Only the layers `memory_layers` (config
`memory.layers`; default all) get the hook, the j-th reading the memory's layer slot j; the others run
their MLP untouched. Memory down rows start at zero, so a
fresh memory leaves the HF model's logits as they were. The hook leaves the modules and their
parameter names as they are: `save_pretrained` writes a plain HF checkpoint (`hmtrain export` writes
it as the export's `anchor/`, which `hmtrain generate` reads back into this class).

The trainer's contract is hmtrain's `Transformer`'s: `layers` (the decoder layers, which
hmtrain/parallel/parallelize.py wraps), `hidden_states`, `output_weight`, and `forward` that returns
logits, or with labels the chunked loss (hmtrain/model/loss.py). Dropout is off (hmtrain's anchor has
none); the model's own values are restored in what `save_pretrained` writes. With
`model.document_mask=true` positions restart at every document and transformers builds the
block-diagonal causal mask from those position ids (its packed-sequence mask); the post-hoc recipe
turns it off, as the open-weight models were trained without it.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from hmtrain.config import ModelConfig
from hmtrain.config.hf import hf_shape
from hmtrain.model.loss import lm_loss_sum
from hmtrain.model.transformer import LayerMemory, memory_slots, positions_in_document

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def check_hf_dir(path: str | Path) -> Path:
    """A local directory with a config.json and weights, or a one-line error naming it."""
    directory = Path(path)
    hf_shape(directory)  # is a directory, with a config.json of a supported architecture
    if not any(any(directory.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise FileNotFoundError(f"config key 'model.hf_path': {directory} holds no weights (*.safetensors or "
                                "pytorch_model.bin, as save_pretrained writes them)")
    return directory


def _dropout_keys(config) -> list[str]:
    return [k for k, v in config.to_dict().items() if isinstance(v, float) and ("dropout" in k or k.endswith("pdrop"))]


class _Slot:
    """Each layer's memory tensors for the forward in progress (gathered before the layers run, outside any
    checkpointed region, so a recomputing backward reads the same tensors)."""

    blocks: Optional[list[tuple[Tensor, ...]]] = None


def _memory_hook(slot: _Slot, index: int, act: nn.Module, gated: bool):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        if slot.blocks is None:
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        tensors = [t.to(x.dtype) for t in slot.blocks[index]]  # the bank's dtype -> the activations'
        if gated:
            u_gate, u_up, u_down = tensors
            hidden = act(torch.bmm(x, u_gate.transpose(1, 2))) * torch.bmm(x, u_up.transpose(1, 2))
        else:
            u_up, u_down = tensors
            hidden = act(torch.bmm(x, u_up.transpose(1, 2)))
        return output + torch.bmm(hidden, u_down.transpose(1, 2))  # [B, T, M] x [B, M, d]

    return hook


def decoder_layers_name(hf: nn.Module) -> str:
    """The dotted name of the module list of decoder layers ("model.layers", GPT-2's "transformer.h"): the
    one list whose modules are of the classes transformers declares unsplittable (`_no_split_modules`, the
    unit its own FSDP and device-map wrapping keeps whole)."""
    classes = set(getattr(hf, "_no_split_modules", None) or ())
    found = [name for name, module in hf.named_modules() if isinstance(module, nn.ModuleList) and len(module)
             and all(type(layer).__name__ in classes for layer in module)]
    if len(found) != 1:
        raise ValueError(f"config key 'model.hf_path': {type(hf).__name__} has {len(found)} lists of decoder "
                         f"layers ({sorted(classes)} in _no_split_modules: {found}); hmtrain needs exactly one")
    return found[0]


class HFAnchor(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int = 2048, path: str | Path | None = None,
                 memory_layers: Optional[Sequence[int]] = None):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = check_hf_dir(path or cfg.hf_path)
        shape = hf_shape(directory)
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if getattr(hf_config, "final_logit_softcapping", None):
            raise ValueError(f"config key 'model.hf_path': {directory} caps its logits (final_logit_softcapping), "
                             "which the chunked loss does not compute")
        limit = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
        if limit is not None and max_seq_len > limit:
            raise ValueError(f"config key 'data.seq_len': {max_seq_len} tokens, but {directory} has "
                             f"{limit} positions")
        self._dropout = {k: getattr(hf_config, k) for k in _dropout_keys(hf_config)}
        for key in self._dropout:
            setattr(hf_config, key, 0.0)
        self.hf = AutoModelForCausalLM.from_pretrained(directory, config=hf_config, local_files_only=True,
                                                       dtype=torch.float32, attn_implementation="sdpa")
        self.cfg, self.max_seq_len, self.gated = cfg, max_seq_len, shape.gated
        self._slot = _Slot()
        self._layers_name = decoder_layers_name(self.hf)
        self.memory_slots = memory_slots(memory_layers, len(self.layers))
        for i, slot in self.memory_slots.items():
            mlp = self.layers[i].mlp
            act = mlp.act_fn if shape.gated else mlp.act
            mlp.register_forward_hook(_memory_hook(self._slot, slot, act, shape.gated), with_kwargs=True)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in place: parallelize wraps them (activation checkpointing, FSDP2's per-block
        `fully_shard`) where the HF model calls them."""
        return self.hf.get_submodule(self._layers_name)

    @property
    def memory_layers(self) -> tuple[int, ...]:
        """The decoder layers whose MLP reads memory, ascending (slot j of a bank row is the j-th)."""
        return tuple(self.memory_slots)

    @property
    def output_weight(self) -> Tensor:
        return self.hf.get_output_embeddings().weight

    def hidden_states(self, tokens: Tensor, *, segments: Optional[Tensor] = None,
                      memory: Optional[LayerMemory] = None) -> Tensor:
        """tokens [B, T] -> the final norm's output [B, T, d_model] (the head's input)."""
        T = tokens.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's max_seq_len {self.max_seq_len}")
        position_ids = positions_in_document(segments) if self.cfg.document_mask and segments is not None else None
        self._slot.blocks = None if memory is None else [memory.layer(j) for j in range(len(self.memory_slots))]
        out = self.hf.base_model(input_ids=tokens, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, tokens: Tensor, *, segments: Optional[Tensor] = None, memory: Optional[LayerMemory] = None,
                labels: Optional[Tensor] = None):
        """As `Transformer.forward`: logits [B, T, vocab], or with `labels` (loss sum, tokens counted)."""
        hidden = self.hidden_states(tokens, segments=segments, memory=memory)
        if labels is not None:
            return lm_loss_sum(hidden, self.output_weight, labels)
        return self.hf.get_output_embeddings()(hidden)

    @contextmanager
    def _own_dropout(self):
        config = self.hf.config
        saved = {k: getattr(config, k) for k in self._dropout}
        for key, value in self._dropout.items():
            setattr(config, key, value)
        try:
            yield
        finally:
            for key, value in saved.items():
                setattr(config, key, value)

    def save_pretrained(self, directory: str | Path) -> None:
        """The anchor as a Hugging Face checkpoint (config.json with the model's own dropout, safetensors)."""
        with self._own_dropout():
            self.hf.save_pretrained(str(directory))


def hf_parameter_count(path: str | Path) -> int:
    """Parameters of the HF model in `path`, counted from its config.json alone (built on the meta device)."""
    hf_shape(path)
    file = Path(path).resolve() / "config.json"
    return _count(str(file.parent), file.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _count(path: str, mtime_ns: int) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
