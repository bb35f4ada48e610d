"""`hmtrain data prepare`: documents -> keys and sample -> tree and tokenizer -> routed, tokenized
files -> shards and manifest, streaming, in stages that resume, on one process or every rank of a
torchrun job.

  stage 1  read every document once (validating it) for its key, split and id uniqueness
           (sample.py); embed the sample (`tree.fit_sample` training documents, 0 = all) and fit
           the tree; train the tokenizer on `data.tokenizer_sample` documents (rank 0)
  stage 2  per input file: embed, route, tokenize, group by (split, leaf) (route.py)
  stage 3  per pack unit (a range of leaves): pack into shards with their index (pack.py); then
           rank 0 merges the indexes, writes the manifest and moves the result to its final name

Input files are dealt to ranks by number and each writes its own outputs; nothing depends on the
number of processes, so one process and N processes give the same prepared directory, file for
file. Work lives in `<prepared>.work/` (work.py): a killed or crashed prepare, rerun with the same
inputs and settings, redoes only unfinished input files and units. An error that rerunning would
repeat (bad input, bad settings) removes the work directory; anything else keeps it for the rerun.
The prepared directory appears under its name complete, or not at all; an existing one is
replaced, atomically, only with `--overwrite`.

Layout of the result (format/manifest.py describes the manifest, format/sequences.py the index):
  manifest.json        splits, per-node token and document counts, size and sha256 of every file
  tree.pt              the hierarchical k-means tree (routes prompts at evaluation)
  tokenizer/           the tokenizer, trained on a sample of the train split
  documents/NNNNN.parquet  per input file, one row per document: id, split, path, tokens
  shards/              webdataset tars {split}-UUUUU-NNNNN.tar, each with its index .idx.npy
  index/               per split: paths, real-token counts, shard and byte offset of every sequence
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from hmtrain.config import Config
from hmtrain.data.corpus.documents import _suffix, list_document_files, read_file
from hmtrain.data.prepare import pack, sample
from hmtrain.data.prepare.finish import write_output_manifest
from hmtrain.data.prepare.meter import Meter
from hmtrain.data.prepare.procs import Group, is_input_error
from hmtrain.data.prepare.route import route_file
from hmtrain.data.prepare.work import Work, building, input_stats, load_npz, read_json, save_npz
from hmtrain.data.routing.embed import build_embedder, default_device, embed_texts
from hmtrain.data.routing.tree import Tree, fit_tree
from hmtrain.data.tokenizer import KINDS, Tokenizer, model_tokenizer, train_tokenizer
from hmtrain.util.files import atomic_write, check_output_dir, recover_dir, replace_dir, sha256_file, write_json

log = logging.getLogger(__name__)

# Fault injection for tests: "stage2:2" makes this process SIGKILL itself right after finishing its
# 2nd input file of stage 2; "stage1:N" counts input files read, "stage3:N" pack units, "finish:1"
# stops before the final move.
KILL_ENV = "HMTRAIN_PREPARE_KILL_AFTER"


def prepare(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> Path:
    return run_prepare(cfg, overwrite=overwrite, progress=progress)[0]


def run_prepare(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> tuple[Path, Meter]:
    """Prepare `cfg.data.documents` into `cfg.data.prepared`; return it and this process's throughput."""
    data = cfg.data
    if not data.documents:
        raise ValueError("config key 'data.documents': no documents given (a file, directory or glob)")
    if data.tokenizer not in KINDS:
        raise ValueError(f"config key 'data.tokenizer': must be one of {KINDS}, got {data.tokenizer!r}")
    if data.tokenizer == "hf":
        model_tokenizer(cfg.model.hf_path)  # the model's tokenizer is readable, before any work
    out = Path(data.prepared)
    check_output_dir(out, "config key 'data.prepared':")
    group = Group(timeout_s=data.prepare_timeout_s)
    try:
        files = group.run("start", lambda: _start(cfg, out, overwrite, group.is_main))
    except Exception:
        group.settle()
        raise
    work = Work.attach(out)
    meter = Meter()
    try:
        _prepare(cfg, group, work, files, meter)
    except Exception as exc:
        if group.is_main and is_input_error(exc):
            work.remove()
        elif group.is_main:
            log.error("prepare stopped; its finished work is kept in %s: rerun the same command to resume",
                      work.root)
        group.settle()
        raise
    for step, r in meter.rates().items():
        log.info("throughput of this process: %-18s %9d documents in %8.1f s (%7.1f CPU s): %9.0f docs/s",
                 step, r["documents"], r["seconds"], r["cpu_seconds"], r["docs_per_s"])
    return out, meter


def _start(cfg: Config, out: Path, overwrite: bool, main: bool) -> list[Path]:
    files = list_document_files(cfg.data.documents)
    for path in files:  # fail on a bad extension before reading anything
        if _suffix(path) is None:
            raise ValueError(f"{path}: unsupported file type (supported: .parquet, .jsonl, .jsonl.gz)")
    if main:
        recover_dir(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} already holds prepared data; pass --overwrite to replace it "
                                  "or set data.prepared to another directory")
        Work.open(out, _plan(cfg, files))
    return files


def data_settings(cfg: Config) -> dict:
    """The settings the prepared directory depends on: two configs that agree on these can share one
    (`hmtrain study` prepares once per distinct value)."""
    d, t = cfg.data, cfg.tree
    keys = ("text_field", "id_field", "embedder", "embed_batch_size", "tokenizer", "tokenizer_vocab",
            "tokenizer_sample", "seq_len", "shard_samples", "heldout_fraction", "seed")
    return {"data": {k: getattr(d, k) for k in keys}, "documents": str(d.documents),
            "tree": {"branching": list(t.branching), "em_steps": t.em_steps, "subsample": t.subsample,
                     "balance": t.balance, "fit_sample": t.fit_sample, "seed": t.seed}}


def _plan(cfg: Config, files: list[Path]) -> dict:
    return {**data_settings(cfg), "files": input_stats(files),
            # the embedder runs in fp16 on a GPU and fp32 on a CPU: a prepare resumed on the other kind of
            # machine starts afresh rather than mixing the two kinds of vectors in one output
            "embed_device": default_device().split(":")[0]}


def _kill_point(stage: str, done: int) -> None:
    if os.environ.get(KILL_ENV) == f"{stage}:{done}":
        log.warning("%s=%s: killing this process", KILL_ENV, os.environ[KILL_ENV])
        os.kill(os.getpid(), signal.SIGKILL)


def _prepare(cfg: Config, group: Group, work: Work, files: list[Path], meter: Meter) -> None:
    """The stages. Every rank calls the same `group.run`s in the same order, and whatever a rank
    decides from the work directory (what is left to do) it decides inside one, so no rank starts
    a stage's work before every rank has read the state it starts from."""
    data, n, main = cfg.data, len(files), group.is_main
    embedder = None

    def get_embedder():
        nonlocal embedder
        if embedder is None:
            embedder = build_embedder(data.embedder)
        return embedder

    def pending(what: str, items: list, finished) -> list:
        todo = [item for item in items if not finished(item)]
        if main:
            log.info("%s: %d of %d to do (%d done earlier)", what, len(todo), len(items), len(items) - len(todo))
        return todo

    def main_only(fn):
        return lambda: fn() if main else None

    # stage 1: keys of every document, the samples, the tree and the tokenizer
    todo = group.run("plan", lambda: pending("stage 1: input files to read", list(range(n)),
                                             lambda i: work.keys(i, "json").exists()))
    group.run("stage 1 (read)", lambda: _read_keys(work, files, group.mine(todo), data, meter))
    num_train, num_heldout = group.run("stage 1 (count)", lambda: _count(work, n, data))
    group.run("stage 1 (sample)", main_only(lambda: _choose_sample(cfg, work, files, num_train)))
    limits = group.run("plan", lambda: read_json(work.root / "sample.json"))
    todo = group.run("plan", lambda: pending("stage 1: input files to sample", list(range(n)),
                                             lambda i: work.sample(i).exists()))
    group.run("stage 1 (embed sample)",
              lambda: _embed_sample(work, files, group.mine(todo), data, limits, get_embedder, meter))
    group.run("stage 1 (fit)", main_only(lambda: _fit(cfg, work, n, num_train, num_heldout, meter)))

    # stage 2: route, tokenize, group by leaf
    tree, tokenizer = group.run("stage 2 (load)", lambda: (Tree.load(work.out / "tree.pt"),
                                                          Tokenizer.load(work.out / "tokenizer")))
    todo = group.run("plan", lambda: pending("stage 2: input files to route", list(range(n)),
                                             lambda i: work.routed(i).exists()))

    def stage2() -> None:
        for done, i in enumerate(group.mine(todo), 1):
            sampled = load_npz(work.sample(i))  # the tree's sample is embedded already
            known = (sampled["records"], sampled["embeddings"]) if sampled["records"].size else None
            with building(work.routed(i)) as tmp:
                record = route_file(files[i], tmp, data=data, embedder=get_embedder(), tree=tree,
                                    tokenizer=tokenizer, meter=meter, known=known)
            log.info("stage 2: routed %s (%d documents; %d of this rank's %d files)", files[i],
                     record["documents"], done, len(group.mine(todo)))
            _kill_point("stage2", done)

    group.run("stage 2", stage2)

    # stage 3: pack units into shards
    branching = list(cfg.tree.branching)
    group.run("stage 3 (plan)", main_only(lambda: _plan_units(work, n, branching, data)))
    units = group.run("plan", lambda: read_json(work.root / "units.json")["units"])
    todo = group.run("plan", lambda: pending("stage 3: pack units to pack", units,
                                             lambda u: work.packed(u).exists()))

    def stage3() -> None:
        for done, unit in enumerate(group.mine(todo), 1):
            t = Meter.now()
            record = pack.pack_unit(work, unit, num_files=n, branching=branching, seq_len=data.seq_len,
                                    shard_samples=data.shard_samples, eot_id=tokenizer.eot_id,
                                    pad_id=tokenizer.pad_id)
            meter.add("3 pack", record["documents"], t)
            _kill_point("stage3", done)

    group.run("stage 3", stage3)
    group.run("finish", main_only(lambda: _finish(cfg, work, files, units, tokenizer, meter)))


def _count(work: Work, n: int, data) -> tuple[int, int]:
    counts = [read_json(work.keys(i, "json")) for i in range(n)]
    num_train = sum(c["documents"] - c["first_train"] for c in counts)
    num_heldout = sum(c["first_train"] for c in counts)
    log.debug("stage 1: %d documents in %d files (%d train, %d heldout)", num_train + num_heldout, n, num_train,
              num_heldout)
    if num_train == 0:
        raise ValueError(f"data.heldout_fraction={data.heldout_fraction} left no training documents "
                         f"out of {num_heldout}")
    return num_train, num_heldout


def _read_keys(work: Work, files: list[Path], mine: list[int], data, meter: Meter) -> None:
    for done, i in enumerate(mine, 1):
        t = Meter.now()
        keys = sample.file_keys(files[i], text_field=data.text_field, id_field=data.id_field, seed=data.seed,
                                fraction=data.heldout_fraction)
        np.save(work.keys(i, "keys.npy"), keys["keys"], allow_pickle=False)
        np.save(work.keys(i, "records.npy"), keys["records"], allow_pickle=False)
        write_json(work.keys(i, "json"), {"documents": len(keys["keys"]), "first_train": int(keys["first_train"])})
        meter.add("1 read+keys", len(keys["keys"]), t)
        _kill_point("stage1", done)


def _load_keys(work: Work, i: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(work.keys(i, "keys.npy"), mmap_mode="r", allow_pickle=False),
            np.load(work.keys(i, "records.npy"), mmap_mode="r", allow_pickle=False))


def _choose_sample(cfg: Config, work: Work, files: list[Path], num_train: int) -> None:
    """Check ids are unique; the key limits of the tree's and the tokenizer's samples."""
    if (work.root / "sample.json").exists():
        return
    data = cfg.data
    sample.check_unique(files, lambda i: _load_keys(work, i),
                        lambda path, record: sample.id_at(path, record, text_field=data.text_field,
                                                          id_field=data.id_field))
    firsts = [read_json(work.keys(i, "json"))["first_train"] for i in range(len(files))]
    train_keys = [_load_keys(work, i)[0][first:] for i, first in enumerate(firsts)]
    tree_limit = sample.threshold(train_keys, cfg.tree.fit_sample)
    bpe = data.tokenizer == "bpe"
    tok_limit = sample.threshold(train_keys, data.tokenizer_sample) if bpe else None
    def size(limit) -> int:  # documents in the sample: training keys <= limit
        return sum(int(np.searchsorted(keys, limit, side="right")) for keys in train_keys)

    sizes = {"tree": size(tree_limit), "tokenizer": size(tok_limit) if bpe else 0}
    write_json(work.root / "sample.json", {"tree": str(tree_limit),
                                           "tokenizer": None if tok_limit is None else str(tok_limit),
                                           "documents": sizes})


def _embed_sample(work: Work, files: list[Path], mine: list[int], data, limits: dict, get_embedder,
                  meter: Meter) -> None:
    """Per input file: the texts of its sampled documents (tokenizer) and their embeddings (tree), in
    record order, embedded in batches from the file's first sampled document."""
    tree_limit = int(limits["tree"])
    tok_limit = None if limits["tokenizer"] is None else int(limits["tokenizer"])
    for i in mine:
        t = Meter.now()
        keys, records = _load_keys(work, i)
        first = read_json(work.keys(i, "json"))["first_train"]
        limit = tree_limit if tok_limit is None else max(tree_limit, tok_limit)
        stop = max(first, int(np.searchsorted(keys, np.uint64(limit), side="right")))
        key_of = dict(zip(records[first:stop].tolist(), keys[first:stop].tolist()))
        for_tree: list[str] = []
        tree_records: list[int] = []
        with atomic_write(work.sample_texts(i), "w", encoding="utf-8") as out:
            found = 0
            batches = read_file(files[i], text_field=data.text_field, id_field=data.id_field, batch_size=4096)
            for batch in batches if key_of else ():
                for doc in batch:
                    key = key_of.get(doc.index)
                    if key is None:
                        continue
                    if key <= tree_limit:
                        for_tree.append(doc.text)
                        tree_records.append(doc.index)
                    if tok_limit is not None and key <= tok_limit:
                        out.write(json.dumps(doc.text) + "\n")
                    found += 1
                if found == len(key_of):
                    break
        emb = (embed_texts(get_embedder(), for_tree, batch_size=data.embed_batch_size, progress=False) if for_tree
               else torch.zeros(0, 0))
        save_npz(work.sample(i), embeddings=emb.numpy(), records=np.asarray(tree_records, dtype=np.int64))
        log.info("stage 1: sampled %s (%d documents for the tree)", files[i], len(for_tree))
        meter.add("1 embed sample", len(for_tree), t)


def _fit(cfg: Config, work: Work, n: int, num_train: int, num_heldout: int, meter: Meter) -> None:
    if (work.root / "fit.json").exists():
        return
    data, tree_cfg = cfg.data, cfg.tree
    t = Meter.now()
    _warn_about_shape(cfg, num_train, num_heldout)
    parts = [e for e in (load_npz(work.sample(i))["embeddings"] for i in range(n)) if e.size]
    emb = torch.from_numpy(np.concatenate(parts))
    log.info("stage 1: fitting the tree on %d sampled training documents", emb.shape[0])
    tree = fit_tree(emb, tree_cfg.branching, steps=tree_cfg.em_steps, subsample=tree_cfg.subsample,
                    balance=tree_cfg.balance, seed=tree_cfg.seed, progress=False)
    tree.save(work.out / "tree.pt")
    t = meter.add("1 fit tree", emb.shape[0], t)
    del emb, parts

    def texts():
        for i in range(n):
            with open(work.sample_texts(i), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    counted = [0]

    def counting():
        for text in texts():
            counted[0] += 1
            yield text

    if data.tokenizer == "hf":
        tokenizer = model_tokenizer(cfg.model.hf_path)
    else:
        tokenizer = train_tokenizer(counting(), kind=data.tokenizer, vocab_size=data.tokenizer_vocab)
    if (work.out / "tokenizer").exists():
        shutil.rmtree(work.out / "tokenizer")
    tokenizer.save(work.out / "tokenizer")
    meter.add("1 train tokenizer", counted[0], t)
    write_json(work.root / "fit.json", {"tree": sha256_file(work.out / "tree.pt"), "tokenizer": tokenizer.name})


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


def _plan_units(work: Work, n: int, branching: list[int], data) -> None:
    if (work.root / "units.json").exists():
        return
    tokens, _ = pack.leaf_totals(work, n, math.prod(branching))
    units = pack.plan_units(tokens, seq_len=data.seq_len, shard_samples=data.shard_samples)
    write_json(work.root / "units.json", {"units": units})


def _finish(cfg: Config, work: Work, files: list[Path], units: list[dict], tokenizer: Tokenizer,
            meter: Meter) -> None:
    """Merge the indexes, write the manifest, move the result to its name, remove the work."""
    t = Meter.now()
    manifest = write_output_manifest(cfg, work, len(files), units, tokenizer)
    meter.add("3 index+manifest", sum(s["sequences"] for s in manifest["splits"].values()), t)
    # A work directory holding this is discarded by the next prepare: it got as far as the move.
    write_json(work.root / "finished.json", {"prepared": str(cfg.data.prepared)})
    _kill_point("finish", 1)
    replace_dir(work.out, Path(cfg.data.prepared))
    work.remove()
