"""`hmtrain data prepare`: documents -> embeddings -> tree -> paths -> tokens -> shards.

Everything is built in `<prepared>.tmp/` and swapped in at the end (files.replace_dir), so a crash
never leaves a half-prepared directory under the final name, a failure removes its `.tmp`, and an
existing prepared directory is only replaced when asked to (`--overwrite`), atomically.

Layout of the result (manifest.py describes the manifest, sequences.py the index):
  manifest.json        splits, per-node token and document counts, size and sha256 of every file
  tree.pt              the hierarchical k-means tree (routes prompts at evaluation)
  tokenizer/           the tokenizer, trained on the train split
  documents.parquet    one row per document: id, split, path, tokens
  shards/              webdataset tars {split}-NNNNN.tar, each with its index {split}-NNNNN.idx.npy
  index/               per split: paths, real-token counts, shard and byte offset of every sequence
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hmtrain.config.schema import Config
from hmtrain.data.documents import read_documents
from hmtrain.data.embed import build_embedder, embed_texts
from hmtrain.data.files import check_output_dir, record_files, recover_dir, replace_dir, staging_dir
from hmtrain.data.manifest import MANIFEST_VERSION, node_counts, write_manifest
from hmtrain.data.packing import pack_leaf
from hmtrain.data.sequences import write_split_index
from hmtrain.data.shards import ShardWriter
from hmtrain.data.tokenizer import KINDS, train_tokenizer
from hmtrain.data.tree import fit_tree

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    """A stable split: a document's side depends only on its id and the seed."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def prepare(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> Path:
    data = cfg.data
    if not data.documents:
        raise ValueError("config key 'data.documents': no documents given (a file, directory or glob)")
    if data.tokenizer not in KINDS:
        raise ValueError(f"config key 'data.tokenizer': must be one of {KINDS}, got {data.tokenizer!r}")
    out = Path(data.prepared)
    check_output_dir(out, "config key 'data.prepared':")
    recover_dir(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds prepared data; pass --overwrite to replace it "
                              "or set data.prepared to another directory")
    embedder = build_embedder(data.embedder, device="cuda" if torch.cuda.is_available() else "cpu")
    with staging_dir(out) as tmp:
        _build(cfg, tmp, embedder, progress)
        replace_dir(tmp, out)
    return out


def _warn_about_shape(cfg: Config, num_train: int, num_heldout: int) -> None:
    leaves = math.prod(cfg.tree.branching)
    if leaves > num_train:
        log.warning("tree.branching %s has %d leaves for %d training documents: at least %d leaves stay empty "
                    "and their memory rows never train; use fewer or smaller levels",
                    list(cfg.tree.branching), leaves, num_train, leaves - num_train)
    if cfg.data.heldout_fraction == 0:
        log.warning("data.heldout_fraction=0: no held-out split, so `hmtrain eval` (held-out perplexity) will "
                    "fail on this data; set data.heldout_fraction > 0 to keep one")
    elif num_heldout == 0:
        log.warning("no document fell in the held-out split (data.heldout_fraction=%s of %d documents), so "
                    "`hmtrain eval` will fail on this data; raise data.heldout_fraction",
                    cfg.data.heldout_fraction, num_train)


def _build(cfg: Config, tmp: Path, embedder, progress: bool) -> None:
    data, tree_cfg = cfg.data, cfg.tree
    docs = list(read_documents(data.documents, text_field=data.text_field, id_field=data.id_field))
    heldout = [is_heldout(d.id, data.heldout_fraction, data.seed) for d in docs]
    train_idx = [i for i, h in enumerate(heldout) if not h]
    if not train_idx:
        raise ValueError(f"data.heldout_fraction={data.heldout_fraction} left no training documents "
                         f"out of {len(docs)}")
    log.info("read %d documents (%d train, %d heldout)", len(docs), len(train_idx), len(docs) - len(train_idx))
    _warn_about_shape(cfg, len(train_idx), len(docs) - len(train_idx))

    texts = [d.text for d in docs]
    emb = embed_texts(embedder, texts, batch_size=data.embed_batch_size, progress=progress, desc="embed documents")

    fit_idx = torch.tensor(train_idx)
    if 0 < tree_cfg.fit_sample < len(train_idx):
        gen = torch.Generator().manual_seed(tree_cfg.seed)
        fit_idx = fit_idx[torch.randperm(len(train_idx), generator=gen)[: tree_cfg.fit_sample]]
    tree = fit_tree(emb[fit_idx], tree_cfg.branching, steps=tree_cfg.em_steps, subsample=tree_cfg.subsample,
                    balance=tree_cfg.balance, seed=tree_cfg.seed, progress=progress)
    paths = tree.route(emb).tolist()
    tree.save(tmp / "tree.pt")

    tokenizer = train_tokenizer((texts[i] for i in train_idx), kind=data.tokenizer, vocab_size=data.tokenizer_vocab)
    tokenizer.save(tmp / "tokenizer")
    tokens = tokenizer.encode_batch(texts)

    pq.write_table(pa.table({
        "id": [d.id for d in docs],
        "split": ["heldout" if h else "train" for h in heldout],
        "path": paths,
        "tokens": [len(t) + 1 for t in tokens],  # + the EOT that ends it
    }), tmp / "documents.parquet")

    splits: dict[str, dict] = {}
    for split in SPLITS:
        by_leaf: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, h in enumerate(heldout):
            if h == (split == "heldout"):
                by_leaf[tuple(paths[i])].append(i)
        # Leaves in order, so ids (grouped by level-1 node when indexed) follow the tree.
        with ShardWriter(tmp, f"shards/{split}", max_samples=data.shard_samples) as writer:
            for leaf in sorted(by_leaf):
                members = ((docs[i].id, tokens[i]) for i in by_leaf[leaf])
                for seq in pack_leaf(members, path=leaf, seq_len=data.seq_len, eot_id=tokenizer.eot_id,
                                     pad_id=tokenizer.pad_id):
                    writer.write(seq)
        splits[split] = write_split_index(tmp, split, writer.close(), branching=tree_cfg.branching)

    train_paths = [(tuple(paths[i]), len(tokens[i]) + 1) for i in train_idx]
    manifest = {
        "version": MANIFEST_VERSION,
        "seq_len": data.seq_len,
        "branching": list(tree_cfg.branching),
        "splits": splits,
        "node_tokens": node_counts(train_paths, tree_cfg.branching),
        "node_documents": node_counts(((p, 1) for p, _ in train_paths), tree_cfg.branching),
        "documents": {"train": len(train_idx), "heldout": len(docs) - len(train_idx)},
        "heldout_fraction": data.heldout_fraction,
        "embedder": embedder.name,
        "tokenizer": "tokenizer",
        "tokenizer_name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "tree": "tree.pt",
        "source": str(data.documents),
        "files": record_files(tmp),
    }
    write_manifest(tmp / "manifest.json", manifest)
