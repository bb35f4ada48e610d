"""Memory models (Badger 2026): the unrolled expansion, the objectives' label layouts, what a chunk's
decoder can see, the masked mixer's causality, stages (freezing, re-initialisation)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hmtrain.config import ConfigError, MemoryModelConfig, StackConfig, StageConfig, load_config
from hmtrain.model import MemoryModel, build_model
from hmtrain.model.mixer import MaskedMixerBlock
from hmtrain.model.objectives import count_targets, layout
from hmtrain.model.stacks import Expansion, unroll_index

PAD = 0
V = 40
STACK = StackConfig(d_model=16, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=32)


def model(context="memory", block="transformer", objective="clm", autoencoder=False, seed=0, chunks=4, n_ctx=5):
    stages = [StageConfig(name="ae", objective="autoencode")] if autoencoder else []
    mm = MemoryModelConfig(block=block, chunks=chunks, n_ctx=n_ctx, encoder=STACK, decoder=STACK, context=context,
                           objective=objective, stages=stages, pad_id=PAD)
    torch.manual_seed(seed)
    m = MemoryModel(mm, V)
    m.objective = objective
    return m.eval()


def per_row_losses(m, tokens, objective="clm"):
    """Cross-entropy per decoder row (row b * scored + c), as the model computes it."""
    hidden, weight, targets = m.outputs(tokens, objective)
    logits = hidden @ weight.T
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return losses.view(targets.shape).sum(1)


# -- the unrolled expansion ------------------------------------------------------------------------

def test_unroll_index_is_a_circular_window_of_half_the_features():
    # d = 6, so each position reads 3 features starting at i mod 6; position 6 wraps to feature 0
    expected = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 0], [5, 0, 1], [0, 1, 2], [1, 2, 3]]
    assert unroll_index(6, 8).tolist() == expected


def test_unrolled_expansion_matches_a_hand_computation():
    d, d_out, n_ctx = 4, 3, 5
    expansion = Expansion("unrolled", d, d_out, n_ctx)
    weight = torch.arange(d_out * (d // 2), dtype=torch.float32).view(d_out, d // 2) / 10
    with torch.no_grad():
        expansion.proj.weight.copy_(weight)
    v = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    out = expansion(v)
    assert out.shape == (1, n_ctx, d_out)
    for i in range(n_ctx):
        window = [v[0, (i + k) % d].item() for k in range(d // 2)]
        for o in range(d_out):
            hand = sum(weight[o, k].item() * window[k] for k in range(d // 2))
            assert out[0, i, o].item() == pytest.approx(hand, abs=1e-6)


def test_repeat_expansion_is_the_same_projection_everywhere_and_odd_widths_cannot_unroll():
    expansion = Expansion("repeat", 4, 3, 6)
    v = torch.randn(2, 4)
    out = expansion(v)
    assert torch.equal(out, expansion.proj(v)[:, None] + expansion.position)
    with pytest.raises(ValueError, match="even"):
        Expansion("unrolled", 5, 3, 6)


# -- label layouts -------------------------------------------------------------------------------

TOKENS = torch.tensor([[11, 12, 13, 21, 22, 23, 31, 32, 33, 41, PAD, PAD]])  # 4 chunks of 3, padded tail


def test_clm_and_autoencode_score_every_real_token_of_every_chunk():
    for objective in ("clm", "autoencode"):
        (part,) = layout(TOKENS, objective, chunks=4, pad_id=PAD)
        assert part.scored == (0, 1, 2, 3)
        assert part.inputs.tolist() == [[[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, PAD, PAD]]]
        assert part.targets.tolist() == [[[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, -100, -100]]]


def test_copy_repeats_the_first_half_and_scores_only_the_copy():
    (part,) = layout(TOKENS, "copy", chunks=4, pad_id=PAD)
    assert part.scored == (2, 3)
    assert part.inputs.tolist() == [[[11, 12, 13], [21, 22, 23], [11, 12, 13], [21, 22, 23]]]
    assert part.targets.tolist() == [[[-100] * 3, [-100] * 3, [11, 12, 13], [21, 22, 23]]]


def test_blank_copy_reads_padding_in_the_second_half_and_combined_adds_clm():
    (blank,) = layout(TOKENS, "blank_copy", chunks=4, pad_id=PAD)
    assert blank.inputs.tolist() == [[[11, 12, 13], [21, 22, 23], [PAD] * 3, [PAD] * 3]]
    assert blank.targets.tolist() == [[[-100] * 3, [-100] * 3, [11, 12, 13], [21, 22, 23]]]
    clm, blank2 = layout(TOKENS, "combined", chunks=4, pad_id=PAD)
    assert torch.equal(blank2.inputs, blank.inputs) and torch.equal(blank2.targets, blank.targets)
    assert clm.scored == (0, 1, 2, 3) and torch.equal(clm.targets, layout(TOKENS, "clm", 4, PAD)[0].targets)
    assert int(count_targets(TOKENS, "clm", 4, PAD)) == 10
    assert int(count_targets(TOKENS, "blank_copy", 4, PAD)) == 6
    assert int(count_targets(TOKENS, "combined", 4, PAD)) == 16


def test_copy_objectives_need_an_even_number_of_chunks():
    with pytest.raises(ValueError, match="even"):
        layout(torch.zeros(1, 9, dtype=torch.long), "blank_copy", chunks=3, pad_id=PAD)


def test_the_model_counts_what_its_loss_sums():
    m = model(objective="combined")
    tokens = torch.randint(1, V, (2, 20))
    tokens[1, -3:] = PAD
    _, counted = m(tokens)
    assert int(counted) == int(m.count_targets(tokens)) == 2 * 20 - 3 + 2 * 10 - 0


# -- what a chunk's decoder can see ------------------------------------------------------------------

def tokens_and_changed(seed=1, chunk=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (2, 20), generator=g)
    changed = tokens.clone()
    changed[:, chunk * 5:(chunk + 1) * 5] = torch.randint(1, V, (2, 5), generator=g)
    return tokens, changed


def test_without_memory_a_chunk_never_depends_on_another_chunks_tokens():
    m = model(context="none")
    tokens, changed = tokens_and_changed()
    before, after = per_row_losses(m, tokens).view(2, 4), per_row_losses(m, changed).view(2, 4)
    assert not torch.equal(before[:, 0], after[:, 0])
    assert torch.equal(before[:, 1:], after[:, 1:])


def test_chunk_0_reaches_chunk_2_only_through_its_memory():
    m = model(context="memory")
    tokens, changed = tokens_and_changed()
    before, after = per_row_losses(m, tokens).view(2, 4), per_row_losses(m, changed).view(2, 4)
    assert not torch.allclose(before[:, 2], after[:, 2])  # the memory of chunk 0 carries the change
    # give the changed sequence the original memories: chunk 2's loss is then exactly the original
    original_encode = m.encode
    memories = {}

    def recording(chunks):
        memories["v"] = original_encode(chunks)
        return memories["v"]

    m.encode = recording
    reference = per_row_losses(m, tokens).view(2, 4)
    m.encode = lambda chunks: memories["v"]
    patched = per_row_losses(m, changed).view(2, 4)
    assert torch.equal(patched[:, 1:], reference[:, 1:])
    assert not torch.equal(patched[:, 0], reference[:, 0])  # chunk 0's own tokens did change


def test_a_chunk_never_sees_later_chunks_and_full_context_sees_everything_before():
    tokens, changed = tokens_and_changed(chunk=3)
    m = model(context="memory")
    before, after = per_row_losses(m, tokens).view(2, 4), per_row_losses(m, changed).view(2, 4)
    assert torch.equal(before[:, :3], after[:, :3])
    full = model(context="full")
    tokens, changed = tokens_and_changed(chunk=0)
    before, after = per_row_losses(full, tokens), per_row_losses(full, changed)
    assert before.shape == (2,)  # one row per sequence
    hidden_b, _, _ = full.outputs(tokens, "clm")
    hidden_a, _, _ = full.outputs(changed, "clm")
    assert not torch.allclose(hidden_b[:, 12], hidden_a[:, 12])  # chunk 2 sees chunk 0's tokens directly


def test_the_masked_mixer_is_causal_and_accepts_shorter_rows():
    torch.manual_seed(0)
    block = MaskedMixerBlock(8, 6, 16)
    x = torch.randn(2, 6, 8)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, 8)
    assert torch.equal(block(x)[:, :4], block(y)[:, :4])
    assert not torch.allclose(block(x)[:, 4:], block(y)[:, 4:])
    assert torch.allclose(block(x[:, :3]), block(x)[:, :3], atol=1e-6)
    assert torch.equal(block.mixing_matrix(6).triu(1), torch.zeros(6, 6))
    with pytest.raises(ValueError, match="length 6"):
        block(torch.randn(1, 7, 8))


def test_mixer_memory_model_keeps_chunks_apart_too():
    m = model(context="memory", block="mixer")
    tokens, changed = tokens_and_changed(chunk=3)
    assert torch.equal(per_row_losses(m, tokens).view(2, 4)[:, :3], per_row_losses(m, changed).view(2, 4)[:, :3])


# -- stages ---------------------------------------------------------------------------------------

def test_set_stage_freezes_its_parts_and_reinitialises_only_when_fresh():
    m = model(autoencoder=True)
    stage = StageConfig(name="blank", objective="blank_copy", freeze=["encoder_blocks"], reinit=["encoder_embedding"])
    blocks = {n: p.detach().clone() for n, p in m.parameters_of("encoder_blocks")}
    embedding = m.encoder_embedding.weight.detach().clone()
    m.set_stage(stage, 1, fresh=False, seed=3)
    assert torch.equal(m.encoder_embedding.weight, embedding) and m.objective == "blank_copy"
    m.set_stage(stage, 1, fresh=True, seed=3)
    assert not torch.equal(m.encoder_embedding.weight, embedding)
    first_draw = m.encoder_embedding.weight.detach().clone()
    m.set_stage(stage, 1, fresh=True, seed=3)
    assert torch.equal(m.encoder_embedding.weight, first_draw)  # a resume re-draws exactly the same values
    assert all(torch.equal(p, blocks[n]) for n, p in m.parameters_of("encoder_blocks"))
    # the stage's frozen blocks, and the autoencoder's decoder, which blank copy never runs
    frozen = {n for part in ("encoder_blocks", "autoencoder_decoder") for n, _ in m.parameters_of(part)}
    assert frozen and all(p.requires_grad == (n not in frozen) for n, p in m.named_parameters())
    loss, count = m(torch.randint(1, V, (2, 20)))
    loss.backward()
    assert all(p.grad is None for n, p in m.named_parameters() if n in frozen)
    assert m.encoder_embedding.weight.grad is not None  # the fresh embedding trains in front of them


def test_parts_cover_every_parameter_once():
    m = model(autoencoder=True)
    names = [n for part in ("encoder", "decoder", "autoencoder_decoder") for n, _ in m.parameters_of(part)]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())


# -- config ---------------------------------------------------------------------------------------

def test_config_names_the_key_of_a_bad_memory_model():
    base = ["model.family=memory_model", "memory_model.chunks=4", "memory_model.n_ctx=8", "data.seq_len=32"]
    assert load_config("tiny", base).memory_model.chunks == 4
    with pytest.raises(ConfigError, match="data.seq_len"):
        load_config("tiny", [*base, "data.seq_len=64"])
    with pytest.raises(ConfigError, match="memory_model.chunks"):
        load_config("tiny", ["model.family=memory_model", "memory_model.chunks=3", "memory_model.n_ctx=8",
                             "data.seq_len=24", "memory_model.objective=blank_copy"])
    with pytest.raises(ConfigError, match=r"stages\[0\].freeze"):
        load_config("tiny", [*base, "memory_model.stages=[{name: a, steps: 2, freeze: [attention]}]"])
    with pytest.raises(ConfigError, match="parallel.engine"):
        load_config("tiny", [*base, "parallel.engine=deepspeed"])
    with pytest.raises(ConfigError, match="model.family"):
        load_config("tiny", ["model.family=encoder"])
    with pytest.raises(ConfigError, match="retention.expansion"):
        load_config("tiny", ["retention.expansion=tiled"])


def test_build_model_picks_the_family_and_lm_uses_no_bank():
    from hmtrain.memory import uses_memory

    cfg = load_config("memory-tiny", ["model.vocab_size=256", "memory_model.pad_id=0"])
    assert isinstance(build_model(cfg), MemoryModel) and not uses_memory(cfg)
    lm = load_config("tiny", ["model.vocab_size=256"])
    assert type(build_model(lm)).__name__ == "Transformer" and uses_memory(lm)
    with pytest.raises(ValueError, match="pad_id"):
        build_model(dataclasses.replace(cfg, memory_model=dataclasses.replace(cfg.memory_model, pad_id=None)))


def test_combined_is_clm_plus_blank_copy_with_shared_memories():
    m = model(objective="combined")
    tokens = torch.randint(1, V, (3, 20), generator=torch.Generator().manual_seed(5))
    combined, count = m(tokens)
    m.objective = "clm"
    clm, clm_count = m(tokens)
    m.objective = "blank_copy"
    blank, blank_count = m(tokens)
    assert int(count) == int(clm_count) + int(blank_count)
    assert combined.item() == pytest.approx((clm + blank).item(), rel=1e-5)
