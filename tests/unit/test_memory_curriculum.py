"""The memory-model curriculum through the real trainer: stage switches, a frozen encoder that stays
bit-identical, and a resume at a stage boundary that redoes the switch exactly."""
import shutil

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from hmtrain.checkpoint.checkpointer import Checkpointer
from hmtrain.checkpoint.verify import read_trainer
from hmtrain.config import load_config
from hmtrain.data.routing.tree import Tree
from hmtrain.data.tokenizer import Tokenizer
from hmtrain.model import build_model
from hmtrain.train.recipe import Recipe
from hmtrain.train.trainer import train
from tests.unit.prepared_helper import PAD, make_prepared

STAGES = ("memory_model.stages=[{name: ae, steps: 3, objective: autoencode, optim: {warmup_steps: 0}}, "
          "{name: blank, steps: 3, objective: blank_copy, freeze: [encoder_blocks], reinit: [encoder_embedding], "
          "optim: {lr: 3e-3, warmup_steps: 0}}, "
          "{name: comb, steps: 3, objective: combined, freeze: [encoder_blocks], optim: {warmup_steps: 0}}]")


def config(prepared, run_dir, *extra):
    return load_config("memory-tiny", [
        f"data.prepared={prepared}", f"train.run_dir={run_dir}", "data.seq_len=16", "tree.branching=[2]",
        "memory.units=[4]", "model.vocab_size=100", "memory_model.chunks=4", "memory_model.n_ctx=4",
        "memory_model.encoder={d_model: 16, n_layers: 1, n_heads: 2, head_dim: 8, ffn_hidden: 32}",
        "memory_model.decoder={d_model: 16, n_layers: 1, n_heads: 2, head_dim: 8, ffn_hidden: 32}",
        STAGES, "train.global_batch_size=4", "train.micro_batch_size=2", "train.checkpoint_every=3",
        "train.keep_checkpoints=5", "train.progress=false", "train.log_every=1", "logging.mlflow=false", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm") / "prepared"
    make_prepared(root, {(0,): 6, (1,): 6}, branching=[2], seq_len=16)
    # the trainer fingerprints the tokenizer and tree files (make_prepared writes neither)
    Tokenizer("byte").save(root / "tokenizer")
    Tree(branching=(2,), centroids=[torch.randn(2, 4)]).save(root / "tree.pt")
    return root


def model_state(checkpoint, cfg):
    model = build_model(cfg)
    state = {"model": get_model_state_dict(model)}
    Checkpointer.load(checkpoint, state)
    return state["model"]


def test_recipe_runs_the_stages_in_order_with_their_own_schedules(prepared, tmp_path):
    recipe = Recipe(config(prepared, tmp_path / "r"), has_memory=False)
    assert recipe.total_steps == 9
    assert [recipe.phase(s) for s in (0, 2, 3, 5, 6, 8)] == ["stage0:ae", "stage0:ae", "stage1:blank", "stage1:blank",
                                                             "stage2:comb", "stage2:comb"]
    assert recipe.at(3).anchor_lr == pytest.approx(3e-3) and recipe.at(3).anchor_trains  # the stage's own peak
    assert recipe.anchor_optim("stage1:blank").lr == pytest.approx(3e-3)


def test_the_frozen_encoder_stays_bit_identical_through_the_curriculum(prepared, tmp_path):
    cfg = config(prepared, tmp_path / "run")
    final = train(cfg)
    assert cfg.memory_model.pad_id == PAD  # filled in from the prepared data
    steps = {p.name: p for p in Checkpointer(tmp_path / "run" / "checkpoints").step_dirs()}
    after_ae = model_state(steps["step_00000003"], cfg)
    after_blank = model_state(steps["step_00000006"], cfg)
    end = model_state(final, cfg)
    encoder_blocks = [k for k in end if k.startswith(("layers.0.", "encoder_norm."))]
    assert encoder_blocks
    for key in encoder_blocks:  # trained by the autoencoder stage, then never touched
        assert torch.equal(after_ae[key], end[key]) and torch.equal(after_blank[key], end[key]), key
    # the fresh embedding in front of the frozen blocks was re-drawn, then trained
    assert not torch.equal(after_ae["encoder_embedding.weight"], after_blank["encoder_embedding.weight"])
    assert not torch.equal(after_blank["encoder_embedding.weight"], end["encoder_embedding.weight"])
    decoder = [k for k in end if k.startswith("decoder_head")]
    assert not torch.equal(after_blank[decoder[0]], end[decoder[0]])
    assert read_trainer(final)["optimizer_phase"] == "stage2:comb"
    # the trainer normalised by the objectives' own target counts: losses are per scored position
    import json
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 10)) and all(0 < r["loss"] < 10 for r in records)


def test_resume_at_a_stage_boundary_redoes_the_switch_exactly(prepared, tmp_path):
    cfg = config(prepared, tmp_path / "run")
    straight = model_state(train(cfg), cfg)
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints")
    for later in checkpoints.step_dirs()[1:]:  # keep only step 3: the end of the autoencoder stage
        shutil.rmtree(later)
    (checkpoints.directory / "latest").unlink()
    resumed = model_state(train(cfg, resume=True), cfg)
    assert straight.keys() == resumed.keys()
    for key in straight:  # the fresh embedding, the new stage's optimizer, the data: all as in one go
        assert torch.equal(straight[key], resumed[key]), key
