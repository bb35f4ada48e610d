"""The post-hoc memory phase on every HF architecture, in process: the trainer's own build and step (bank,
plan, fetch, gradient return, sparse AdamW) on a frozen tiny random anchor, then the export of a trained
checkpoint read back by transformers and by `hmtrain generate`.

The corpus is one where leaf identity decides the continuation and the anchor cannot know it: every
document is question/answer pairs "q a q a ...", the questions drawn from 8 tokens shared by every leaf,
each leaf answering question q with its own token (a random table per leaf, no answer shared between
leaves). A sequence's fetched memory can learn its leaf's table; the generic memory (one set of rows for
every sequence) can at best spread its bet over the 4 leaves' answers, ln 4 nats on every answer token.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hmtrain.config import load_config
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.loader import sequential_batches
from hmtrain.data.routing.tree import Tree
from hmtrain.data.tokenizer import model_tokenizer
from hmtrain.eval.loading import load_trained
from hmtrain.eval.scoring import heldout_perplexity
from hmtrain.parallel.dist import DistInfo
from hmtrain.serve.export import export_checkpoint
from hmtrain.train.build import build
from hmtrain.train.throughput import Window
from hmtrain.train.trainer import train, train_step
from tests.hf_export import check_hf_export
from tests.hf_models import ARCHS, EOT, PAD, save_tiny
from tests.unit.prepared_helper import leaf_paths, make_prepared

SEQ_LEN, BRANCHING, QUESTIONS = 32, [2, 2], 8
QUESTION_IDS = np.arange(QUESTIONS) + 32  # byte ids of the tiny models' byte vocabulary
ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def leaf_facts_corpus(root: Path, model_dir: Path, seed: int = 0, seq_len: int = SEQ_LEN):
    """16 train and 4 held-out sequences per leaf of the 2 x 2 tree, in the anchor's own vocabulary (its
    tokenizer.json's name, EOT and PAD), with the tokenizer and a tree (random centroids for the hashing
    embedder) beside them, as `hmtrain data prepare` leaves them for training, export and generate."""
    leaves = leaf_paths(BRANCHING)
    answers = np.arange(100, 100 + len(leaves) * QUESTIONS).reshape(len(leaves), QUESTIONS)
    g = np.random.default_rng(seed)
    table = {leaf: g.permutation(answers[i]) for i, leaf in enumerate(leaves)}  # leaf: question -> answer

    def tokens_of(split, leaf, s):
        questions = np.random.default_rng([seed, s]).choice(QUESTION_IDS, size=seq_len // 2 + 1)
        pairs = np.stack([questions, table[leaf][questions - QUESTION_IDS[0]]], 1)
        return pairs.reshape(-1)[: seq_len + 1]

    tokenizer = model_tokenizer(model_dir)
    tokenizer.save(root / "tokenizer")
    torch.manual_seed(seed)
    Tree(branching=tuple(BRANCHING), centroids=[torch.randn(2, 16), torch.randn(4, 16)]).save(root / "tree.pt")
    return make_prepared(root, {leaf: 16 for leaf in leaves}, branching=BRANCHING, seq_len=seq_len,
                         shard_samples=64, heldout={leaf: 4 for leaf in leaves}, tokens_of=tokens_of,
                         manifest={"eot_id": EOT, "pad_id": PAD, "vocab_size": tokenizer.vocab_size,
                                   "tokenizer_name": tokenizer.name, "embedder": "hashing"})


def posthoc_config(model_dir: Path, prepared: Path, run_dir: Path, *extra: str):
    seq_len = PreparedData.open(prepared).manifest["seq_len"]
    return load_config("posthoc-tiny", [
        f"model.hf_path={model_dir}", f"data.prepared={prepared}", f"data.seq_len={seq_len}",
        f"tree.branching={BRANCHING}", "memory.units=[8,8]", "train.global_batch_size=8", "train.micro_batch_size=8",
        "train.memory_optim.lr=1e-1", f"train.run_dir={run_dir}", "train.device=cpu", "train.progress=false",
        "logging.mlflow=false", *extra])


def heldout_nll(run, variant: str) -> float:
    run.model.eval()
    try:
        batches = sequential_batches(run.data, "heldout", 16)
        return heldout_perplexity(run.model, run.bank, batches, variant, ONE_PROCESS.device)["nll"]
    finally:
        run.model.train()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_memory_phase_on_a_frozen_anchor_learns_each_leafs_facts(arch, tmp_path):
    """60 steps of the trainer's own step (train_step) on the frozen anchor. Measured over seeds 0, 1, 2 of
    every architecture (15 runs): the anchor alone scores 6.03-6.47 nats a held-out token, fetched memory
    3.06-3.74 (at least 2.48 below the anchor), generic 4.24-4.80 (fetched at least 0.99 below it); the
    margins asserted are half those."""
    # init std 0.2: at transformers' 0.02 a width-32 model's logits span under a nat, whatever its memory adds
    model_dir = save_tiny(arch, tmp_path / arch, init_range=0.2)
    data = leaf_facts_corpus(tmp_path / "prepared", model_dir)
    cfg = posthoc_config(model_dir, data.root, tmp_path / "run", "train.memory_steps=60")
    run = build(cfg, ONE_PROCESS, data)
    assert run.bank is not None and run.recipe.total_steps == 60 and not run.recipe.at(0).anchor_trains
    anchor_alone = heldout_nll(run, "none")
    assert heldout_nll(run, "fetched") == anchor_alone  # down rows start at zero: the HF model's own loss

    run.engine.set_trainable(run.recipe.at(0).anchor_trains)  # as the trainer's loop starts the phase
    window = Window()
    for step in range(run.recipe.total_steps):
        now = run.recipe.at(step)
        train_step(run, now, step, run.batches.next(now.global_batch), window)

    original = load_file(model_dir / "model.safetensors")
    state = {name.removeprefix("hf."): value for name, value in run.model.state_dict().items()}
    for key, value in original.items():  # (a tied head is stored once, as its embedding)
        assert torch.equal(state[key], value), f"{arch}: {key} changed"
    fetched, generic = heldout_nll(run, "fetched"), heldout_nll(run, "generic")
    assert fetched < anchor_alone - 1.2, (arch, fetched, anchor_alone)
    assert fetched < generic - 0.5, (arch, fetched, generic)
    assert generic < anchor_alone, (arch, generic, anchor_alone)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_export_of_a_cotrained_anchor_is_read_back_by_transformers(arch, tmp_path):
    """Three steps of `hmtrain train` (in process) with the anchor co-trained, so that the export must write
    the checkpoint's weights, not its source's (tied heads, Gemma's scaled embeddings, GPT-2's Conv1D
    layout among them); then `hmtrain export`: transformers reads `anchor/` back to the trained anchor's
    logits, and generate from the export continues as the checkpoint's model with the same memory."""
    model_dir = save_tiny(arch, tmp_path / arch)
    data = leaf_facts_corpus(tmp_path / "prepared", model_dir, seq_len=64)  # room for the prompt and 8 tokens
    cfg = posthoc_config(model_dir, data.root, tmp_path / "run", "train.anchor=cotrain", "train.memory_steps=3",
                         "train.checkpoint_every=3", "train.log_every=1")
    train(cfg)
    manifest = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    assert manifest["bank"]["kind"]["name"] == ("ffn_ungated" if arch == "gpt2" else "ffn")
    exported = check_hf_export(tmp_path / "run", tmp_path / "exported", model_dir)
    original = load_file(model_dir / "model.safetensors")
    trained = {k.removeprefix("hf."): v for k, v in load_trained(tmp_path / "run").model.state_dict().items()}
    assert exported.keys() == original.keys()  # a tied head stays tied: stored once, as its embedding
    assert all(torch.equal(value, trained[key]) for key, value in exported.items())
    assert not all(torch.equal(value, original[key]) for key, value in exported.items())  # it trained
