"""`model`: the anchor transformer (paper's 160M preset: OpenLM, 35 layers, d 512), or an open-weight
Hugging Face causal LM read from a local directory (`family: hf`, hmtrain/config/hf.py reads its shape)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hmtrain.config.checks import Choice, require, require_positive


class FfnImpl(Choice):
    auto = "auto"
    torch = "torch"
    triton = "triton"


class Attention(Choice):
    auto = "auto"
    flex = "flex"
    sdpa = "sdpa"


class Family(Choice):
    lm = "lm"
    memory_model = "memory_model"
    hf = "hf"


@dataclass
class ModelConfig:
    # null: the prepared data's tokenizer size, padded up to `vocab_multiple` rows (the paper's
    # 50,432 is GPT-NeoX's 50,277 padded); a number must cover the tokenizer
    vocab_size: Optional[int] = None
    # the vocabulary is padded up to a multiple of this many rows (GPU-friendly matrix shapes)
    vocab_multiple: int = 128
    # the anchor's hidden size
    d_model: int = 512
    # transformer blocks in the anchor
    n_layers: int = 35
    # attention heads per block
    n_heads: int = 12
    # dimension of each attention head (n_heads x head_dim need not equal d_model)
    head_dim: int = 32
    # SwiGLU hidden units of each block's FFN (the memory's units are added beside them)
    ffn_hidden: int = 2048
    # the output head reuses the input embedding table
    tie_embeddings: bool = True
    # RMSNorm on queries and keys before RoPE (stabilises attention logits)
    qk_norm: bool = True
    # RoPE's base frequency (positions restart at every document)
    rope_base: float = 100_000.0
    # epsilon of every RMSNorm
    norm_eps: float = 1e-5
    # standard deviation of the normal initialisation of the anchor's weights
    init_std: float = 0.02
    # memory-augmented FFN implementation. auto is torch on every device until a GPU run of the
    # kernel benchmark shows the Triton kernels correct and faster (docs/benchmarks.md)
    ffn_impl: FfnImpl = FfnImpl.auto
    # auto is flex (compiled FlexAttention, block-sparse document mask) on CUDA and sdpa (a dense
    # [B,1,T,T] document mask) elsewhere: FlexAttention has no CPU backward
    attention: Attention = Attention.auto
    # lm: the anchor transformer above; memory_model: the encoder-decoder of the `memory_model`
    # section (Badger 2026), trained by the same trainer (the sizes above are then unused)
    # hf: an open-weight causal LM (Llama, Qwen2/Qwen3, Gemma 3, GPT-2) from the local directory `hf_path`,
    # its sizes above read from that directory's config.json (hmtrain/model/hf_anchor.py)
    family: Family = Family.lm
    # model.family=hf: a local directory as `save_pretrained` writes it (config.json, *.safetensors,
    # tokenizer.json); nothing is ever downloaded
    hf_path: str = ""
    # attention never crosses a document in a packed row, and positions restart at each document (the
    # paper's pretraining); false: plain causal attention over the row, as open-weight models were trained
    document_mask: bool = True

    def validate(self) -> None:
        if self.family == Family.hf:
            require(bool(self.hf_path), "model.hf_path", "model.family=hf needs the model's local directory")
        require_positive(self, "model", "vocab_multiple", "d_model", "n_layers", "n_heads", "head_dim", "ffn_hidden")
        if self.vocab_size is not None:
            require(self.vocab_size > 0, "model.vocab_size",
                    f"must be positive (or null: the tokenizer's), got {self.vocab_size}")
        require(self.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {self.head_dim}")
