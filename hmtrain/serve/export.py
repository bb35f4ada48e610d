"""`hmtrain export`: a checkpoint as a self-contained directory to run a trained model from.

    <out>/manifest.json      format, shapes, dtypes, byte offsets, sizes and sha256 of every file,
                             and what produced it (checkpoint, step, data fingerprints)
    <out>/bank/level{i}.npy  one plain .npy per bank table (levels from 1), rows contiguous (memory/mapped_bank.py)
    <out>/bank/generic.npy   the generic memory row, when the run trained one
    <out>/anchor.safetensors hmtrain's own anchor (`model.family=lm`): its state dict (with tied embeddings
                             the head is `tok_embeddings.weight`, stored once), the model config in its
                             metadata (`config`, `max_seq_len`): readable by safetensors alone, no hmtrain code
    <out>/anchor/            an open-weight anchor (`model.family=hf`) instead: a Hugging Face checkpoint
                             (config.json, model.safetensors, as `save_pretrained` writes them, and the
                             source directory's tokenizer files), which transformers' `from_pretrained` reads
    <out>/config.yaml        the checkpoint's config (the model config is also in the manifest)
    <out>/<tokenizer>/, <out>/<tree file>   copied from the prepared data the run was trained on

The bank is read from the DCP checkpoint one table at a time (DCP loads a subset of keys), straight
into the memory-mapped output file: the process holds at most one saved chunk of one table in RAM
(DCP reads each saved chunk whole), never the bank's optimizer moments. Everything is written into
`<out>.tmp`, fsynced, and renamed to `<out>` once complete, so a crash never leaves a directory
named `<out>` that is not a whole export.

One format for both anchor families: the manifest's `model.family` says which anchor file the export
holds; the bank tables, tree and tokenizer are the same. An HF anchor is always written from the
checkpoint's weights (a frozen anchor's equal its source directory's bit for bit; a co-trained one's do
not), in float32, the dtype it trained in. The manifest's bank section lists the decoder layers whose
memory a row holds (`layers`: memory.layers resolved; a row has one layer slot each), and `load_model`
gives the anchor memory on exactly those (an export without the list has memory in every layer).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import hmtrain
from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.checkpoint.formats import saved_name
from hmtrain.checkpoint.resume import check_data_fingerprints
from hmtrain.checkpoint.verify import CONFIG_FILE, CheckpointError
from hmtrain.config import Config, ModelConfig, load_config
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.tree import Tree
from hmtrain.data.tokenizer import Tokenizer
from hmtrain.eval.loading import read_checkpoint
from hmtrain.memory import memory_layers, uses_memory
from hmtrain.memory.fetched import GENERIC
from hmtrain.memory.kind import memory_kind
from hmtrain.memory.mapped_bank import STORAGE, MappedBank
from hmtrain.memory.sizes import level_nodes
from hmtrain.model import HFAnchor, Transformer, count_parameters, run_model_config
from hmtrain.util.files import (
    aside_names,
    atomic_write,
    check_output_dir,
    record_files,
    recover_dir,
    replace_dir,
    sha256_file,
    staging_dir,
)

FORMAT = "hmtrain.export"
VERSION = 3
READS = (1, 2, 3)  # version 1 stored the anchor as a torch pickle, anchor.pt; 3 added model.family (before: lm)
MANIFEST = "manifest.json"
ANCHOR_FILE = "anchor.safetensors"
HF_DIR = "anchor"  # an HF anchor's save_pretrained directory
ANCHOR_FAMILIES = ("lm", "hf")  # the model.family values of the anchors an export holds
# what a tokenizer of an HF model directory may consist of (AutoTokenizer reads these; copied when present)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
TIED_HEAD = "output.weight"  # not stored when the embeddings are tied: it is tok_embeddings.weight
BANK_DIR = "bank"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
AGAIN = "export the checkpoint again (`hmtrain export --overwrite`)"


def save_anchor(model: Transformer, path: Path) -> None:
    """The anchor as safetensors, with what rebuilds it in the metadata (safetensors stores a tensor once)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == TIED_HEAD)}
    metadata = {"format": "pt", "config": json.dumps(asdict(model.cfg)), "max_seq_len": str(model.max_seq_len)}
    safetensors.torch.save_file(state, str(path), metadata=metadata)


def save_hf_anchor(model: HFAnchor, source: Path, directory: Path) -> None:
    """An HF anchor as a Hugging Face checkpoint, with the tokenizer files of the directory it came from."""
    model.save_pretrained(directory)
    for name in HF_TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def _load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    state = {"model": get_model_state_dict(model)}
    Checkpointer.load(checkpoint, state)
    set_model_state_dict(model, state["model"])


def _write_anchor(cfg: Config, checkpoint: Path, tmp: Path) -> dict:
    """The checkpoint's anchor into the staging directory; its manifest entry."""
    if cfg.model.family == "hf":
        model = HFAnchor(cfg.model, max_seq_len=cfg.data.seq_len)  # the architecture of model.hf_path
        _load_weights(model, checkpoint)
        save_hf_anchor(model, Path(cfg.model.hf_path), tmp / HF_DIR)
        # the config's hf_path is the export's own anchor directory (relative to the export), never the source
        return {"family": "hf", "dir": HF_DIR, "config": {**asdict(cfg.model), "hf_path": HF_DIR},
                "max_seq_len": cfg.data.seq_len, "parameters": count_parameters(cfg.model),
                "source": str(Path(cfg.model.hf_path).resolve())}
    model_cfg = run_model_config(cfg.model, cfg.train.mode, cfg.train.dense_multiplier)
    model = Transformer(model_cfg, max_seq_len=cfg.data.seq_len)
    _load_weights(model, checkpoint)
    save_anchor(model, tmp / ANCHOR_FILE)
    return {"family": "lm", "file": ANCHOR_FILE, "config": asdict(model_cfg), "max_seq_len": cfg.data.seq_len,
            "parameters": count_parameters(model_cfg)}


def bank_tables(cfg: Config) -> dict[str, tuple[Optional[int], tuple[int, ...]]]:
    """Table name -> (tree level or None, full shape) of the bank a config trains, as MemoryBank lays it out."""
    n_layers, kind = len(memory_layers(cfg)), memory_kind(cfg)  # a row holds the memory layers' slots
    tables: dict[str, tuple[Optional[int], tuple[int, ...]]] = {}
    for level, (nodes, m) in enumerate(zip(level_nodes(cfg.tree.branching), cfg.memory.units)):
        if m > 0:
            tables[f"level{level + 1}"] = (level, (nodes, *kind.row_shape(n_layers, m)))
    if cfg.memory.generic:
        tables[GENERIC] = (None, (1, *kind.row_shape(n_layers, sum(cfg.memory.units))))
    return tables


def _saved_tables(path: Path, tables: dict, record: dict) -> str:
    """Check the checkpoint holds every table with the config's shape; return their dtype name."""
    try:
        saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001 - unpickling a broken .metadata
        raise CheckpointError(f"checkpoint {path}: its DCP metadata is unreadable ({exc})") from exc
    dtypes = set()
    for name, (_, shape) in tables.items():
        entry = saved.get(f"bank.{saved_name(name, record)}.weight")
        if entry is None or not hasattr(entry, "size"):
            raise CheckpointError(f"checkpoint {path}: bank table {name} is missing, although its config trains it")
        if tuple(entry.size) != shape:
            raise CheckpointError(f"checkpoint {path}: bank table {name} has shape {tuple(entry.size)}, its config "
                                  f"gives {shape}")
        if entry.properties.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"checkpoint {path}: bank table {name} is {entry.properties.dtype}; export "
                                  f"supports {', '.join(DTYPE_NAMES.values())}")
        dtypes.add(DTYPE_NAMES[entry.properties.dtype])
    if len(dtypes) > 1:
        raise CheckpointError(f"checkpoint {path}: bank tables mix dtypes {sorted(dtypes)}")
    return dtypes.pop() if dtypes else "float32"


def _write_table(checkpoint: Path, name: str, shape: tuple[int, ...], dtype: str, file: Path) -> dict:
    """One table from the checkpoint into a new .npy, through a writable memory map (DCP fills it in place)."""
    array = np.lib.format.open_memmap(file, mode="w+", dtype=STORAGE[dtype], shape=shape)
    target = torch.from_numpy(array)
    if dtype == "bfloat16":
        target = target.view(torch.bfloat16)  # the same bytes: bf16 bit patterns stored as uint16
    Checkpointer.load(checkpoint, {"bank": {f"{name}.weight": target}})
    array.flush()
    row_bytes = int(np.prod(shape[1:])) * array.dtype.itemsize
    entry = {"file": file.name, "shape": list(shape), "data_offset": int(array.offset), "row_bytes": row_bytes}
    del target, array
    return entry


def _fsync_files(root: Path) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_out(out: Path, overwrite: bool, protected: list[Path]) -> None:
    check_output_dir(out, "--out")
    resolved = out.resolve()
    for path in protected:
        path = path.resolve()
        if resolved == path or resolved in path.parents:
            raise ValueError(f"--out {out} is or holds {path}, which the export reads; choose another directory")
    recover_dir(out)  # a swap an earlier export was killed in the middle of
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, config: Optional[str] = None,
                      overrides: tuple[str, ...] | list[str] = (), overwrite: bool = False) -> dict:
    """Write the export of `checkpoint` (a step directory or a run directory) to `out`; return its manifest.

    The tree and tokenizer come from the prepared data named by `data.prepared` of `config` + `overrides`
    when given (overrides alone apply to the checkpoint's own config), else of the checkpoint's config;
    its fingerprints must be the ones the checkpoint was trained with."""
    out = Path(out)
    path, record, cfg = read_checkpoint(checkpoint, hint="export it with --checkpoint")
    data_cfg = cfg if config is None and not overrides else load_config(config or path / CONFIG_FILE, overrides)
    prepared = Path(data_cfg.data.prepared)
    _check_out(out, overwrite, [path, prepared])
    data = PreparedData.open(prepared, verify="checksums" if data_cfg.data.verify_checksums else "sizes")
    data.check_compatible(cfg)
    check_data_fingerprints(path, record, data.fingerprints(), data.root)
    tables = bank_tables(cfg) if uses_memory(cfg) else {}
    dtype = _saved_tables(path, tables, record)

    with staging_dir(out) as tmp:
        bank = None
        if tables:
            (tmp / BANK_DIR).mkdir()
            entries = {}
            for name, (level, shape) in tables.items():
                entries[name] = _write_table(path, name, shape, dtype, tmp / BANK_DIR / f"{name}.npy")
                entries[name].update(file=f"{BANK_DIR}/{name}.npy", level=level)
            offsets = np.concatenate([[0], np.cumsum(cfg.memory.units)[:-1]]).tolist()
            for name, entry in entries.items():  # where each level's units sit in a sequence's fetched memory
                entry["unit_offset"] = 0 if entry["level"] is None else int(offsets[entry["level"]])
            layers, d = memory_layers(cfg), cfg.model.d_model
            n_layers = len(layers)
            # `layers`: the decoder layers that read the rows' layer slots, in order (memory.layers resolved)
            bank = {"n_layers": n_layers, "layers": list(layers), "d_model": d, "kind": memory_kind(cfg).spec(),
                    "branching": list(cfg.tree.branching),
                    "units": list(cfg.memory.units), "generic": cfg.memory.generic, "dtype": dtype,
                    "storage_dtype": STORAGE[dtype].str, "tables": entries,
                    "fetched_parameters": n_layers * memory_kind(cfg).params_per_unit * sum(cfg.memory.units),
                    "bank_parameters": sum(int(np.prod(s)) for n, (_, s) in tables.items() if n != GENERIC)}

        model_entry = _write_anchor(cfg, path, tmp)
        shutil.copyfile(path / CONFIG_FILE, tmp / CONFIG_FILE)
        tokenizer_src, tree_src = data.root / data.manifest["tokenizer"], data.root / data.manifest["tree"]
        tokenizer_name, tree_name = tokenizer_src.name, tree_src.name
        shutil.copytree(tokenizer_src, tmp / tokenizer_name)
        shutil.copyfile(tree_src, tmp / tree_name)

        manifest = {
            "format": FORMAT, "version": VERSION,
            "source": {"checkpoint": str(path.resolve()), "step": int(record["step"]),
                       "mode": cfg.train.mode, "config_sha256": record.get("config_sha256"),
                       "data_fingerprints": record.get("data_fingerprints"), "prepared": str(data.root.resolve()),
                       "hmtrain_version": hmtrain.__version__},
            "model": model_entry,
            "tokenizer": tokenizer_name, "tree": tree_name,
            "embedder": {"name": data.manifest["embedder"], "dim": data.tree.dim},
            "bank": bank,
            "files": record_files(tmp),
        }
        _fsync_files(tmp)
        with atomic_write(tmp / MANIFEST, "w") as f:  # last: the manifest lists every file before it
            f.write(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
    return manifest


class Export:
    """An export directory, opened: manifest checked, files present with their recorded sizes."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest

    @classmethod
    def open(cls, root: str | Path, *, checksums: bool = False) -> "Export":
        root = Path(root)
        if not root.is_dir():
            tmp, _ = aside_names(root)
            hint = (f"; {tmp} is an unfinished export (interrupted): {AGAIN}" if tmp.exists()
                    else " (write one with `hmtrain export --checkpoint DIR --out DIR`)")
            raise FileNotFoundError(f"export {root}: no such directory{hint}")
        file = root / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"export {root}: no {MANIFEST}; not an hmtrain export, or an unfinished one")
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"export {root}: {MANIFEST} is not valid JSON ({exc}); {AGAIN}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"export {root}: {MANIFEST} is not an hmtrain export manifest (format {FORMAT!r})")
        if manifest.get("version") not in READS:
            raise ValueError(f"export {root}: format version {manifest.get('version')!r}, this hmtrain reads "
                             f"{', '.join(map(str, READS))}; {AGAIN}")
        missing = [k for k in ("model", "tokenizer", "tree", "embedder", "bank", "files") if k not in manifest]
        if missing:
            raise ValueError(f"export {root}: {MANIFEST} lacks {', '.join(missing)}; {AGAIN}")
        try:
            files = {rel: (int(entry["bytes"]), str(entry["sha256"])) for rel, entry in manifest["files"].items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"export {root}: the files section of {MANIFEST} is malformed ({exc!r}); {AGAIN}") from exc
        for rel, (expected, digest) in files.items():
            target = root / rel
            if not target.is_file():
                raise FileNotFoundError(f"export {root}: {rel} is missing (listed in {MANIFEST}); {AGAIN}")
            size = target.stat().st_size
            if size != expected:
                raise ValueError(f"export {root}: {rel} holds {size} bytes, {MANIFEST} says {expected}: "
                                 f"truncated or replaced; {AGAIN}")
            if checksums and sha256_file(target) != digest:
                raise ValueError(f"export {root}: {rel}: sha256 differs from {MANIFEST}'s: corrupt; {AGAIN}")
        return cls(root, manifest)

    @property
    def step(self) -> int:
        return int(self.manifest["source"]["step"])

    @property
    def embedder(self) -> str:
        return self.manifest["embedder"]["name"]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.root / self.manifest["tokenizer"])

    @cached_property
    def tree(self) -> Tree:
        return Tree.load(self.root / self.manifest["tree"])

    def load_model(self, device: str | torch.device = "cpu") -> Transformer | HFAnchor:
        """The anchor, as training built it: hmtrain's Transformer, or the HF model of `anchor/` with the
        memory hooks on its MLPs (hmtrain/model/hf_anchor.py)."""
        entry = self.manifest["model"]
        family = entry.get("family", "lm") if isinstance(entry, dict) else None  # before version 3: lm
        if family not in ANCHOR_FAMILIES:
            raise ValueError(f"export {self.root}: {MANIFEST} names an anchor of family {family!r}, this hmtrain "
                             f"reads {', '.join(ANCHOR_FAMILIES)}; {AGAIN}")
        try:
            model = self._hf_anchor(entry) if family == "hf" else self._lm_anchor(entry)
            bank = self.manifest["bank"]
            if bank is not None and len(model.memory_layers) != int(bank["n_layers"]):
                raise ValueError(f"the bank's rows hold {bank['n_layers']} layer(s), memory layers "
                                 f"{list(model.memory_layers)} of the anchor read {len(model.memory_layers)}")
        except (KeyError, TypeError, ValueError, RuntimeError, EOFError, OSError, safetensors.SafetensorError) as exc:
            raise ValueError(f"export {self.root}: the anchor cannot be loaded ({' '.join(str(exc).split())[:300]}); "
                             f"{AGAIN}") from exc
        return model.to(device).eval()

    @property
    def memory_layers(self) -> Optional[list[int]]:
        """The decoder layers that read the bank (None: all, as exports from before memory.layers mean)."""
        bank = self.manifest["bank"]
        return None if bank is None else bank.get("layers")

    def _lm_anchor(self, entry: dict) -> Transformer:
        model = Transformer(ModelConfig(**entry["config"]), max_seq_len=int(entry["max_seq_len"]),
                            memory_layers=self.memory_layers)
        file = self.root / entry["file"]
        if file.suffix == ".safetensors":
            state = safetensors.torch.load_file(file)
            if model.cfg.tie_embeddings:
                state[TIED_HEAD] = state["tok_embeddings.weight"]
        else:  # a version-1 export
            state = torch.load(file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model

    def _hf_anchor(self, entry: dict) -> HFAnchor:
        """Read with transformers from the export's own directory (the config's hf_path is relative to it)."""
        return HFAnchor(ModelConfig(**entry["config"]), max_seq_len=int(entry["max_seq_len"]),
                        path=self.root / entry["dir"], memory_layers=self.memory_layers)

    def bank(self, device: str | torch.device = "cpu") -> Optional[MappedBank]:
        """The memory-mapped bank, or None for a model trained without memory (dense, or no memory phase)."""
        entry = self.manifest["bank"]
        return None if entry is None else MappedBank.open(self.root, entry, device=device)
