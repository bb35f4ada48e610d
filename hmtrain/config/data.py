"""`data`: where documents come from and where prepared shards go."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hmtrain.config.checks import Choice, require, require_positive


class Tokenizer(Choice):
    bpe = "bpe"
    byte = "byte"
    hf = "hf"


@dataclass
class DataConfig:
    # the documents to prepare: a file, a directory of .parquet/.jsonl/.jsonl.gz files, or a glob
    documents: str = ""
    # the field holding each document's text
    text_field: str = "text"
    # the field holding each document's id (null: its position in the input)
    id_field: Optional[str] = "id"
    # prepared data directory (tree, tokenizer, shards, manifest)
    prepared: str = "data/prepared"
    # minilm | hashing | module:Class (a plug-in): open-ended, so a string (hmtrain/data/routing/embed.py checks it)
    embedder: str = "minilm"
    # documents per batch of the embedder
    embed_batch_size: int = 64
    # byte (256 ids, nothing to train), bpe (trained on the documents at prepare) or hf (the tokenizer.json
    # of model.hf_path: an open-weight anchor's own vocabulary)
    tokenizer: Tokenizer = Tokenizer.bpe
    # the BPE tokenizer's vocabulary size
    tokenizer_vocab: int = 4096
    # training documents sampled to train the bpe tokenizer (bounds its memory); 0 = all
    tokenizer_sample: int = 100_000
    # tokens per training sequence (documents are packed per leaf, separated by EOT)
    seq_len: int = 2048
    # sequences per webdataset shard
    shard_samples: int = 1024
    # share of each leaf's documents held out for evaluation
    heldout_fraction: float = 0.05
    # probe questions (probes.jsonl from `hmtrain data synth`) scored by `hmtrain eval`
    probes: Optional[str] = None
    # seed of the held-out split and the tokenizer's sample (>= 0)
    seed: int = 0
    # DataLoader worker processes that read and assemble batches (0 = in the training process)
    num_workers: int = 0
    # also check every prepared file's sha256 when training / eval starts (sizes are always checked)
    verify_checksums: bool = False
    # seconds a `data prepare` process waits for the others at a stage's end (under torchrun); rank 0
    # fits the tree and trains the tokenizer meanwhile, so this must cover them
    prepare_timeout_s: int = 3600

    def validate(self) -> None:
        require_positive(self, "data", "seq_len", "shard_samples", "embed_batch_size", "prepare_timeout_s")
        require(self.tokenizer_sample >= 0, "data.tokenizer_sample",
                f"must be >= 0 (0 = all training documents), got {self.tokenizer_sample}")
        require(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        require(bool(self.text_field), "data.text_field", "must name the documents' text field")
        require(bool(self.prepared), "data.prepared", "must name the prepared data directory")
        require(self.tokenizer != Tokenizer.bpe or self.tokenizer_vocab >= 258, "data.tokenizer_vocab",
                f"a bpe tokenizer needs >= 258 (256 bytes + 2 special tokens), got {self.tokenizer_vocab}")
        require(0.0 <= self.heldout_fraction < 1.0, "data.heldout_fraction",
                f"must be in [0, 1), got {self.heldout_fraction}")
