"""Tiny random Hugging Face causal LMs for the tests, one per supported architecture, saved as
`save_pretrained` writes them, with a byte-level tokenizer.json (256 bytes, EOT 256, PAD 257)."""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "gpt2")
VOCAB, EOT, PAD = 300, 256, 257


def hf_config(arch: str, d: int = 32, layers: int = 2, init_range: float = 0.02):
    """`init_range`: the weights' init std (transformers' initializer_range); at its default 0.02 a width-32
    model's logits span well under one nat, too little for a test that needs the model to learn facts."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

    ids = dict(vocab_size=VOCAB, eos_token_id=EOT, pad_token_id=PAD, bos_token_id=EOT, initializer_range=init_range)
    if arch == "gpt2":
        return GPT2Config(n_embd=d, n_layer=layers, n_head=2, n_positions=256, **ids)
    kw = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, **ids)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=d // 2, sliding_window=16, query_pre_attn_scalar=d // 2, **kw)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch](
        **({"head_dim": d // 2} if arch == "qwen3" else {}), **kw)


def byte_tokenizer():
    """A tokenizers.Tokenizer over the 256 byte symbols (no merges), then EOT and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet, key=lambda s: bytes(
        [_BYTE_OF[s]])))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    return tok


def _byte_map() -> dict[str, int]:
    # GPT-2's bytes_to_unicode: the printable symbol ByteLevel uses for each byte
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _byte_map()


def save_tiny(arch: str, directory: Path, *, seed: int = 0, d: int = 32, layers: int = 2,
              init_range: float = 0.02) -> Path:
    """A random model of `arch` with the byte tokenizer in `directory` (returned)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, d, layers, init_range))
    model.save_pretrained(directory)
    byte_tokenizer().save(str(Path(directory) / "tokenizer.json"))
    return Path(directory)
