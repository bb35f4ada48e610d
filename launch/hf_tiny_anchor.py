"""A randomly initialised Llama of a few million parameters, saved as `save_pretrained` writes it, with a
byte-level BPE tokenizer.json trained on a corpus: the starting point of docs/results.md's post-hoc run
(launch/hf_posthoc_run.sh), which pretrains it with hmtrain, exports it and gives it memories.

    python launch/hf_tiny_anchor.py --documents DOCS --out DIR [--d 128 --layers 4 --vocab 2048 --seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hmtrain.data.corpus.documents import read_documents
from hmtrain.data.tokenizer import HF_FILE, train_tokenizer


def build(documents: str, out: Path, *, d: int, layers: int, vocab: int, seed: int) -> int:
    """Writes config.json, model.safetensors and tokenizer.json to `out`; returns the parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = train_tokenizer((doc.text for doc in read_documents(documents)), vocab_size=vocab)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=d, intermediate_size=3 * d,
                         num_hidden_layers=layers, num_attention_heads=d // 32, num_key_value_heads=d // 64,
                         head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer._hf.save(str(out / HF_FILE))  # the file alone: data.tokenizer=hf reads it, ids from config.json
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", required=True, help="documents to train the tokenizer on")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--d", type=int, default=128, help="hidden size (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary, special tokens included")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.d < 64 or args.d % 64:
        print(f"--d: {args.d} is not a positive multiple of 64 (heads of 32, 2 query heads per KV head)",
              file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"--out: {args.out} exists; give a new directory", file=sys.stderr)
        return 2
    n = build(args.documents, args.out, d=args.d, layers=args.layers, vocab=args.vocab, seed=args.seed)
    print(f"wrote {args.out}: Llama, d {args.d}, {args.layers} layers, {n:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
