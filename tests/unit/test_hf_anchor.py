"""model.family=hf: tiny random HF models of every supported architecture, saved with save_pretrained."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from hmtrain.config import ConfigError, load_config
from hmtrain.config.parallel import ParallelConfig
from hmtrain.memory.kind import SwiGLUUnits, UngatedUnits, memory_kind
from hmtrain.model import build_model
from hmtrain.model.sizes import count_parameters
from hmtrain.parallel.dist import DistInfo
from hmtrain.parallel.parallelize import parallelize
from tests.hf_models import ARCHS, save_tiny


def _cfg(path, *extra):
    return load_config("posthoc-tiny", [f"model.hf_path={path}", "data.seq_len=64", *extra])


class _Memory:
    def __init__(self, kind, batch, units=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        d = kind.width
        self.blocks = [kind.layer_tensors([torch.randn(batch, units, d, generator=g) for _ in kind.slots])
                       for _ in range(2)]

    def layer(self, i):
        return self.blocks[i]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_anchor_matches_hf_and_reads_memory(arch, tmp_path):
    path = save_tiny(arch, tmp_path / arch)
    cfg = _cfg(path)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (32, 2, 300)
    kind = memory_kind(cfg)
    assert isinstance(kind, UngatedUnits if arch == "gpt2" else SwiGLUUnits)
    assert kind.params_per_unit == (2 if arch == "gpt2" else 3) * 32
    model = build_model(cfg)
    # the decoder layers parallelize wraps are the list the HF model runs (its _no_split_modules classes)
    assert model.layers is (model.hf.transformer.h if arch == "gpt2" else model.hf.model.layers)
    reference = AutoModelForCausalLM.from_pretrained(path)
    assert count_parameters(cfg.model) == sum(p.numel() for p in reference.parameters())
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), reference(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        # a fresh memory (down rows zero) changes nothing; a nonzero one changes the logits
        memory = _Memory(kind, 2)
        zero_down = _Memory(kind, 2)
        for blocks in zero_down.blocks:
            blocks[-1].zero_()
        torch.testing.assert_close(model(tokens, memory=zero_down), theirs, rtol=0, atol=1e-5)
        assert (model(tokens, memory=memory) - theirs).abs().max() > 1e-2
    loss, count = model(tokens, labels=tokens)
    expected = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), tokens.flatten(), reduction="sum")
    assert int(count) == tokens.numel()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


def test_memory_hook_is_the_extra_units(tmp_path):
    """Llama: the memory adds exactly act(x Ug^T) * (x Uu^T) Ud^T to layer 0's MLP output."""
    path = save_tiny("llama", tmp_path / "m", layers=1)
    model = build_model(_cfg(path))
    mlp = model.layers[0].mlp
    x = torch.randn(2, 7, 32)
    memory = _Memory(memory_kind(_cfg(path)), 2)
    model._slot.blocks = memory.blocks
    with torch.no_grad():
        got = mlp(x)
        g, u, dn = memory.blocks[0]
        wide_gate = torch.cat([mlp.gate_proj.weight.expand(2, -1, -1), g], 1)
        wide_up = torch.cat([mlp.up_proj.weight.expand(2, -1, -1), u], 1)
        wide_down = torch.cat([mlp.down_proj.weight.expand(2, -1, -1), dn], 2)
        want = (torch.nn.functional.silu(x @ wide_gate.transpose(1, 2)) * (x @ wide_up.transpose(1, 2))) @ \
            wide_down.transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_activation_checkpointing_recomputes_the_hf_layers_with_the_same_memory(arch, tmp_path):
    """parallel.activation_checkpointing on an HF anchor: the backward runs every MLP (and its memory hook) a
    second time, on the memory tensors of the forward, and every gradient is the unwrapped model's."""
    path = save_tiny(arch, tmp_path / arch)
    cfg = _cfg(path)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    one_process = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    grads, calls = {}, {}
    for checkpointing in (False, True):
        model = parallelize(build_model(cfg), ParallelConfig(activation_checkpointing=checkpointing), one_process,
                            None)
        ran = []
        for layer in model.layers:  # before the MLP: the recompute stops once it has what the backward needs
            layer.mlp.register_forward_pre_hook(lambda *_: ran.append(1))
        memory = _Memory(memory_kind(cfg), 2)
        leaves = [t.requires_grad_() for blocks in memory.blocks for t in blocks]
        loss, _ = model(tokens, memory=memory, labels=tokens)
        forward_calls = len(ran)
        loss.backward()
        calls[checkpointing] = (forward_calls, len(ran))
        grads[checkpointing] = [t.grad for t in leaves] + [p.grad for p in model.parameters()]
    assert calls == {False: (2, 2), True: (2, 4)}  # two layers; recomputed in the backward
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a local directory"):
        _cfg(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        _cfg(tmp_path / "empty")
    path = save_tiny("qwen3", tmp_path / "q")
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        build_model(_cfg(path))


def test_table2_sizes_from_hand_written_configs():
    from hmtrain.info import size_summary

    for preset, fetched, bank in (("posthoc-gemma3-270m", 23_224_320, 5_945_425_920),
                                  ("posthoc-qwen2.5-0.5b", 43_352_064, 11_098_128_384),
                                  ("posthoc-llama3.2-1b", 102_236_160, 14_092_861_440)):
        summary = size_summary(load_config(preset))
        assert (summary["fetched"], summary["bank"]) == (fetched, bank), preset
