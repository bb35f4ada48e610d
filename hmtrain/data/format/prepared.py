"""Open a prepared-data directory, check it matches its manifest, and check that a config can train on it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow.parquet as pq

from hmtrain.config import Config
from hmtrain.data.format.manifest import read_manifest, verify_manifest_files
from hmtrain.data.format.sequences import Sequences
from hmtrain.data.routing.tree import Tree
from hmtrain.data.tokenizer import Tokenizer, model_tokenizer
from hmtrain.util.files import aside_names

VERIFY = (None, "sizes", "checksums")


@dataclass
class PreparedData:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, *, verify: str | None = "sizes") -> "PreparedData":
        """Open `root`; `verify` checks every file against the manifest: "sizes" (cheap: one stat per
        file, the default), "checksums" (reads everything) or None."""
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        root = Path(root)
        if not root.exists():
            _, old = aside_names(root)
            if old.is_dir():
                raise FileNotFoundError(f"{root} does not exist, but {old} does: an interrupted "
                                        f"`hmtrain data prepare --overwrite` left the previous data there; "
                                        f"rerun it (it puts {old.name} back first) or rename {old.name} to {root.name}")
        if not (root / "manifest.json").is_file():
            work = root.with_name(root.name + ".work")
            if work.is_dir():
                raise FileNotFoundError(f"{root}: no prepared data yet: an unfinished `hmtrain data prepare` "
                                        f"left its work in {work}; rerun that command to finish it")
            raise FileNotFoundError(f"{root}: no manifest.json; run `hmtrain data prepare` first "
                                    "(or point data.prepared at a prepared directory)")
        data = cls(root=root, manifest=read_manifest(root / "manifest.json"))
        if verify is not None:
            data.verify(checksums=verify == "checksums")
        return data

    def verify(self, *, checksums: bool = False) -> None:
        """Raise naming the first file whose size (or sha256) differs from the manifest, or that is missing."""
        verify_manifest_files(self.root, self.manifest["files"], checksums=checksums)

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
    def splits(self) -> dict[str, int]:
        """Sequences per split."""
        return {name: split["sequences"] for name, split in self.manifest["splits"].items()}

    def sequences(self, split: str) -> Sequences:
        """Random access to a split's sequences by id (see sequences.py)."""
        entry = self.manifest["splits"].get(split)
        if entry is None:
            raise ValueError(f"{self.root} has no split {split!r} (splits: {', '.join(self.manifest['splits'])})")
        if entry["sequences"] == 0 and split == "heldout":
            raise ValueError(f"{self.root} has no held-out sequences (prepared with data.heldout_fraction="
                             f"{self.manifest.get('heldout_fraction', '?')}); prepare it with a fraction > 0")
        m = self.manifest
        return Sequences(self.root, split, entry, m["files"], seq_len=m["seq_len"], levels=len(m["branching"]),
                         eot_id=m["eot_id"], pad_id=m["pad_id"])

    def documents(self, columns: list[str] | None = None):
        """The per-document table: id, split, path, tokens (input file by input file)."""
        import pyarrow as pa

        names = self.manifest.get("document_tables", ["documents.parquet"])  # one table before the streaming prepare
        return pa.concat_tables([pq.read_table(self.root / name, columns=columns) for name in names])

    def check_compatible(self, cfg: Config) -> None:
        """The config must describe the tree and sequence length the data was prepared with."""
        m = self.manifest
        if list(cfg.tree.branching) != list(m["branching"]):
            raise ValueError(f"config key 'tree.branching' is {list(cfg.tree.branching)} but {self.root} "
                             f"was prepared with {m['branching']}")
        if cfg.data.seq_len != m["seq_len"]:
            raise ValueError(f"config key 'data.seq_len' is {cfg.data.seq_len} but {self.root} was prepared "
                             f"with {m['seq_len']}")
        if cfg.model.family == "hf":  # an open-weight anchor reads only its own vocabulary
            own = model_tokenizer(cfg.model.hf_path).name
            if m.get("tokenizer_name") != own:
                raise ValueError(f"{self.root} was prepared with tokenizer {m.get('tokenizer_name')!r}, not the "
                                 f"anchor's own {own!r} (tokenizer.json of {cfg.model.hf_path}); prepare it with "
                                 "data.tokenizer=hf and that model.hf_path")
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < m["vocab_size"]:  # None: the tokenizer's
            raise ValueError(f"config key 'model.vocab_size' is {cfg.model.vocab_size}, smaller than the "
                             f"tokenizer's {m['vocab_size']} in {self.root}")
