"""Open a prepared-data directory and check that a config can train on it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow.parquet as pq

from hmtrain.config.schema import Config
from hmtrain.data.shards import read_manifest
from hmtrain.data.tokenizer import Tokenizer
from hmtrain.data.tree import Tree


@dataclass
class PreparedData:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> "PreparedData":
        root = Path(root)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root}: no manifest.json; run `hmtrain data prepare` first "
                                    "(or point data.prepared at a prepared directory)")
        return cls(root=root, manifest=read_manifest(root / "manifest.json"))

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.root / self.manifest["tokenizer"])

    @cached_property
    def tree(self) -> Tree:
        return Tree.load(self.root / self.manifest["tree"])

    def fingerprints(self) -> dict[str, str]:
        """sha256 of the tokenizer and tree files (cached): checkpoints record them, and `eval`
        and `train --resume` refuse prepared data whose fingerprints differ."""
        if "_fingerprints" not in self.__dict__:
            import hashlib

            out = {}
            for name in ("tokenizer", "tree"):
                path = self.root / self.manifest[name]
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                digest = hashlib.sha256()
                for file in files:
                    digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
                    digest.update(file.read_bytes())
                out[name] = digest.hexdigest()
            self.__dict__["_fingerprints"] = out
        return self.__dict__["_fingerprints"]

    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    def shards(self, split: str) -> list[dict]:
        entries = self.manifest["splits"].get(split, [])
        if not entries:
            raise ValueError(f"{self.root}: split {split!r} has no shards")
        return entries

    def documents(self):
        """The per-document table: id, split, path, tokens."""
        return pq.read_table(self.root / "documents.parquet")

    def check_compatible(self, cfg: Config) -> None:
        """The config must describe the tree and sequence length the data was prepared with."""
        m = self.manifest
        if list(cfg.tree.branching) != list(m["branching"]):
            raise ValueError(f"config key 'tree.branching' is {list(cfg.tree.branching)} but {self.root} "
                             f"was prepared with {m['branching']}")
        if cfg.data.seq_len != m["seq_len"]:
            raise ValueError(f"config key 'data.seq_len' is {cfg.data.seq_len} but {self.root} was prepared "
                             f"with {m['seq_len']}")
        if cfg.model.vocab_size < m["vocab_size"]:
            raise ValueError(f"config key 'model.vocab_size' is {cfg.model.vocab_size}, smaller than the "
                             f"tokenizer's {m['vocab_size']} in {self.root}")
