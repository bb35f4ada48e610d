"""Stage 2 of `prepare`: one input file -> its documents embedded, routed, tokenized and grouped by
(split, leaf), in `routed/NNNNN/` of the work directory.

Files, in the order (split, leaf, record) unless said otherwise:
  tokens.bin         int32: every document's tokens (no EOT: the packer puts it between documents)
  doc_offsets.npy    int64 [n + 1]: where each document's tokens start in tokens.bin
  ids.bin            the documents' ids, utf-8, back to back; id_offsets.npy int64 [n + 1] cuts them
  groups.npy         int64 [g, 5]: (split 0 train / 1 heldout, leaf, group key, first doc, end doc),
                     sorted by group key = split * leaves + leaf, so a leaf range is one slice
  documents.parquet  record order: id, split, path, tokens (incl. EOT); becomes documents/NNNNN.parquet
  done.json          counts, and the parquet's size and sha256 (hashed here, not at the end)

Memory is bounded by one input file's per-document metadata plus one batch of texts: tokens go to
disk in arrival order as they are made, then are copied in leaf order a chunk at a time.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hmtrain.data.corpus.documents import read_file
from hmtrain.data.format.manifest import SPLITS
from hmtrain.data.prepare.meter import Meter
from hmtrain.data.prepare.sample import doc_keys, heldout_mask
from hmtrain.data.routing.embed import embed_texts
from hmtrain.util.files import sha256_file, write_json

READ_BATCH = 1024  # documents read, embedded, routed and tokenized together
_COPY_DOCS = 4096  # documents copied into leaf order at once


def _doc_schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("split", pa.string()), ("path", pa.list_(pa.int64())),
                      ("tokens", pa.int64())])


def route_file(path: Path, dest: Path, *, data, embedder, tree, tokenizer, meter: Meter,
               known: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Write `dest` (a fresh directory) for input file `path`; return its done.json record.

    `known` = (record numbers ascending, their embeddings): documents embedded already (stage 1's
    sample), which are not embedded again."""
    known_records, known_emb = known if known is not None else (np.zeros(0, np.int64), None)
    num_leaves = tree.num_nodes(tree.num_levels() - 1)
    splits, leaves, lengths, ids = [], [], [], []
    with open(dest / "arrival.bin", "wb") as arrival, \
            pq.ParquetWriter(dest / "documents.parquet", _doc_schema()) as table:
        t = Meter.now()
        for batch in read_file(path, text_field=data.text_field, id_field=data.id_field, batch_size=READ_BATCH):
            t = meter.add("2 read", len(batch), t)
            texts, batch_ids = [d.text for d in batch], [d.id for d in batch]
            held = heldout_mask(doc_keys(batch_ids, data.seed), data.heldout_fraction)
            index = np.fromiter((d.index for d in batch), dtype=np.int64, count=len(batch))
            pos = np.searchsorted(known_records, index).clip(max=max(len(known_records) - 1, 0))
            hit = (known_records[pos] == index) if len(known_records) else np.zeros(len(batch), dtype=bool)
            todo = np.flatnonzero(~hit)
            emb = torch.empty(len(batch), embedder.dim)
            if hit.any():
                emb[torch.from_numpy(hit)] = torch.from_numpy(known_emb[pos[hit]])
            if len(todo):
                emb[torch.from_numpy(todo)] = embed_texts(embedder, [texts[i] for i in todo],
                                                          batch_size=data.embed_batch_size, progress=False)
            t = meter.add("2 embed", len(todo), t)
            paths = tree.route(emb).numpy()
            t = meter.add("2 route", len(batch), t)
            tokens = tokenizer.encode_batch(texts)
            lens = np.fromiter((len(x) for x in tokens), dtype=np.int64, count=len(tokens))
            flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in tokens])
            t = meter.add("2 tokenize", len(batch), t)
            arrival.write(flat.tobytes())
            table.write_table(pa.table({"id": batch_ids, "split": [SPLITS[int(h)] for h in held],
                                        "path": paths.tolist(), "tokens": lens + 1}, schema=_doc_schema()))
            splits.append(held.astype(np.int64))
            leaves.append(paths[:, -1].astype(np.int64))
            lengths.append(lens)
            ids.extend(batch_ids)
            t = meter.add("2 write", len(batch), t)
    split, leaf, length = np.concatenate(splits), np.concatenate(leaves), np.concatenate(lengths)
    n = len(ids)
    order = np.lexsort((np.arange(n), leaf, split))
    _write_grouped(dest, order, length, ids)
    group_key = split[order] * num_leaves + leaf[order]
    starts = np.flatnonzero(np.r_[True, group_key[1:] != group_key[:-1]])
    ends = np.r_[starts[1:], n]
    groups = np.stack([split[order][starts], leaf[order][starts], group_key[starts], starts, ends], axis=1)
    np.save(dest / "groups.npy", groups.astype(np.int64), allow_pickle=False)
    os.unlink(dest / "arrival.bin")
    t = meter.add("2 group", n, t)
    record = {"documents": n, "heldout": int(split.sum()), "tokens": int(length.sum() + n),
              "table": {"bytes": (dest / "documents.parquet").stat().st_size,
                        "sha256": sha256_file(dest / "documents.parquet")}}
    write_json(dest / "done.json", record)
    return record


def _write_grouped(dest: Path, order: np.ndarray, length: np.ndarray, ids: list[str]) -> None:
    """tokens.bin, doc_offsets.npy, ids.bin, id_offsets.npy in (split, leaf, record) order."""
    arrival_offsets = np.concatenate([[0], np.cumsum(length)])
    grouped_len = length[order]
    np.save(dest / "doc_offsets.npy", np.concatenate([[0], np.cumsum(grouped_len)]).astype(np.int64))
    id_bytes = [ids[i].encode("utf-8") for i in order.tolist()]
    np.save(dest / "id_offsets.npy", np.concatenate([[0], np.cumsum([len(b) for b in id_bytes])]).astype(np.int64))
    with open(dest / "ids.bin", "wb") as f:
        for start in range(0, len(id_bytes), _COPY_DOCS):
            f.write(b"".join(id_bytes[start : start + _COPY_DOCS]))
    source = np.memmap(dest / "arrival.bin", dtype=np.int32, mode="r") if arrival_offsets[-1] else np.zeros(0, np.int32)
    with open(dest / "tokens.bin", "wb") as f:
        for start in range(0, len(order), _COPY_DOCS):
            chunk = order[start : start + _COPY_DOCS].tolist()
            pieces = [source[arrival_offsets[i] : arrival_offsets[i + 1]] for i in chunk]
            if pieces:
                f.write(np.concatenate(pieces).astype(np.int32, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    del source


class RoutedFile:
    """Reads one routed file's documents by grouped position (for the packer)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.groups = np.load(self.root / "groups.npy", allow_pickle=False)
        self.doc_offsets = np.load(self.root / "doc_offsets.npy", mmap_mode="r", allow_pickle=False)
        self.id_offsets = np.load(self.root / "id_offsets.npy", mmap_mode="r", allow_pickle=False)
        self._tokens = os.open(self.root / "tokens.bin", os.O_RDONLY)
        self._ids = os.open(self.root / "ids.bin", os.O_RDONLY)

    def groups_between(self, low_key: int, high_key: int) -> np.ndarray:
        """Rows of groups.npy whose group key is in [low_key, high_key)."""
        keys = self.groups[:, 2]
        return self.groups[np.searchsorted(keys, low_key):np.searchsorted(keys, high_key)]

    def documents(self, start: int, end: int, chunk: int = _COPY_DOCS):
        """(id, int32 tokens) of grouped documents [start, end)."""
        for lo in range(start, end, chunk):
            hi = min(end, lo + chunk)
            off = np.asarray(self.doc_offsets[lo : hi + 1])
            tokens = np.frombuffer(self._pread(self._tokens, 4 * int(off[-1] - off[0]), 4 * int(off[0])), "<i4")
            id_off = np.asarray(self.id_offsets[lo : hi + 1])
            id_bytes = self._pread(self._ids, int(id_off[-1] - id_off[0]), int(id_off[0]))
            base, id_base = int(off[0]), int(id_off[0])
            for i in range(hi - lo):
                doc_id = id_bytes[int(id_off[i]) - id_base : int(id_off[i + 1]) - id_base].decode("utf-8")
                yield doc_id, tokens[int(off[i]) - base : int(off[i + 1]) - base]

    def _pread(self, fd: int, size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{self.root}: {size} bytes expected at {offset}, got {len(data)}: a truncated work "
                             "file; delete the work directory and prepare again")
        return data

    def close(self) -> None:
        for fd in (self._tokens, self._ids):
            os.close(fd)
        self.doc_offsets = self.id_offsets = None  # type: ignore[assignment]
