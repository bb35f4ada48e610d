"""`memory.layers` (the paper's App. F): memory in all decoder layers or only some; the bank's rows hold the
memory layers' slots only, and the other layers run the plain anchor block."""
import io

import numpy as np
import pytest
import torch
from rich.console import Console

from hmtrain.config import ConfigError, load_config
from hmtrain.info import layer_spans, print_info, size_summary
from hmtrain.memory import MemoryBank, build_bank, memory_layers
from hmtrain.memory.kind import memory_kind
from hmtrain.model import Transformer, build_model
from hmtrain.model.sizes import activation_bytes

SMALL = ["model.d_model=16", "model.n_layers=6", "model.n_heads=2", "model.head_dim=8", "model.ffn_hidden=24",
         "model.vocab_size=61", "tree.branching=[2,3]", "memory.units=[4,2]", "data.seq_len=16"]


def small(*extra):
    return load_config("tiny", [*SMALL, *extra])


@pytest.mark.parametrize("n_layers, thirds", [
    (6, [(0, 1), (2, 3), (4, 5)]),
    (4, [(0, 1), (2,), (3,)]),  # np.array_split: the first n % 3 thirds take one layer more
    (35, [tuple(range(12)), tuple(range(12, 24)), tuple(range(24, 35))]),
])
def test_thirds_cut_as_array_split(n_layers, thirds):
    for name, layers in zip(("early", "middle", "late"), thirds):
        assert memory_layers(load_config("tiny", [f"model.n_layers={n_layers}", f"memory.layers={name}"])) == layers
    assert memory_layers(load_config("tiny", [f"model.n_layers={n_layers}"])) == tuple(range(n_layers))
    assert memory_layers(load_config("tiny", [f"model.n_layers={n_layers}", "memory.layers=[0,3]"])) == (0, 3)


@pytest.mark.parametrize("value, message", [
    ("lat", "must be all, early, middle, late or a list of layer indices, got 'lat'"),
    ("2", "must be all, early, middle, late or a list of layer indices, got 2"),
    ("[]", "the list of layer indices is empty"),
    ("[1,6]", r"layer indices must lie in 0..5 \(model.n_layers=6\), got \[1, 6\]"),
    ("[-1]", r"layer indices must lie in 0..5"),
    ("[2,2]", r"layer indices repeat: \[2, 2\]"),
    ("[3,1]", r"layer indices must be ascending, got \[3, 1\]"),
    ("[1.5]", r"layer indices must be ints, got \[1.5\]"),
])
def test_bad_layers_are_one_line_errors_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=rf"config key 'memory.layers': {message}"):
        small(f"memory.layers={value}")


def test_a_model_too_shallow_for_a_third_is_refused():
    with pytest.raises(ConfigError, match="'memory.layers': late: a model of 2 layer"):
        small("model.n_layers=2", "memory.layers=late")


def test_all_is_the_bank_of_every_layer_bit_for_bit():
    cfg = small()
    bank, before = build_bank(cfg), MemoryBank(n_layers=6, kind=memory_kind(cfg), branching=[2, 3], units=[4, 2])
    assert [s.row_shape for s in bank.specs] == [s.row_shape for s in before.specs]
    assert bank.num_parameters() == before.num_parameters() and bank.fetched_parameters() == 6 * 3 * 16 * 6
    for name, table in bank.tables.items():
        assert torch.equal(table, before.tables[name]), name
    assert build_model(cfg).memory_layers == tuple(range(6))


def test_late_memory_sizes_the_bank_and_info_by_its_layers():
    full, late = small(), small("memory.layers=late")
    bank = build_bank(late)
    assert all(s.row_shape[0] == 2 for s in bank.specs)  # layers 4 and 5 only
    assert bank.num_parameters() * 3 == build_bank(full).num_parameters()
    assert size_summary(late)["bank"] * 3 == size_summary(full)["bank"]
    assert size_summary(late)["fetched"] == bank.fetched_parameters() == size_summary(full)["fetched"] // 3
    assert layer_spans((0, 1, 2, 5, 7, 8)) == "0-2, 5, 7-8"
    out = io.StringIO()
    info = {name: print_info(c, Console(file=out, width=200)) for name, c in (("late", late), ("all", full))}
    assert "memory in 2 of 6 decoder layers (memory.layers=late): 4-5" in out.getvalue()
    weights = "bank weights (fp32, 0 top level(s) replicated)"
    assert info["late"]["per_rank"][weights] * 3 == info["all"]["per_rank"][weights]
    assert info["late"]["eval"]["bank_weights"] * 3 == info["all"]["eval"]["bank_weights"]


def layer_outputs(model: Transformer, tokens, memory) -> list[torch.Tensor]:
    seen = []
    handles = [layer.register_forward_hook(lambda m, args, out: seen.append(out)) for layer in model.layers]
    with torch.no_grad():
        model(tokens, memory=memory)
    for handle in handles:
        handle.remove()
    return seen


def test_late_memory_starts_with_no_effect_and_trains_only_the_late_layers():
    cfg = small("memory.layers=late", "train.memory_optim.lr=0.05")
    torch.manual_seed(0)
    model, bank = build_model(cfg), build_bank(cfg)
    for p in model.parameters():
        p.requires_grad_(False)  # the anchor frozen: only the bank trains
    tokens, paths = torch.randint(0, 61, (2, 12)), torch.tensor([[0, 1], [1, 5]])
    anchor = layer_outputs(model, tokens, None)
    fresh = layer_outputs(model, tokens, bank.lookup(paths))
    for got, want in zip(fresh, anchor):
        torch.testing.assert_close(got, want)  # step 0: the memory adds nothing
    for _ in range(3):
        plan = bank.plan_step([(paths, None)])
        memory = bank.fetch(plan, 0)
        model(tokens, memory=memory).square().mean().backward()
        bank.return_grads(memory)
        bank.reduce_grads()
        bank.finish_grads()
        bank.step(cfg.train.memory_optim.lr)
    trained = layer_outputs(model, tokens, bank.lookup(paths))
    for i in range(4):  # early and middle layers have no memory code: bit for bit the anchor's
        assert torch.equal(trained[i], anchor[i]), i
    assert (trained[4] - anchor[4]).abs().max() > 1e-4 and (trained[5] - anchor[5]).abs().max() > 1e-4


def test_late_gradients_equal_an_all_layer_memory_that_is_zero_elsewhere():
    """The hand-built reference: memory in every layer, zero in layers 0-3 (so it does nothing there) and
    the late bank's rows in 4-5. Same loss; its late slots' gradients are the late bank's; the rest zero."""
    late_cfg, all_cfg = small("memory.layers=late"), small()
    torch.manual_seed(0)
    late_model = build_model(late_cfg)
    all_model = build_model(all_cfg)
    all_model.load_state_dict(late_model.state_dict())
    late_bank, all_bank = build_bank(late_cfg), build_bank(all_cfg)
    gen = torch.Generator().manual_seed(1)
    for name, table in late_bank.tables.items():
        table.copy_(torch.randn(table.shape, generator=gen) * 0.3)  # a trained memory: down rows nonzero
        all_bank.tables[name].zero_()
        all_bank.tables[name][:, 4:6] = table
    tokens, paths = torch.randint(0, 61, (2, 12)), np.array([[0, 1], [1, 5]])
    losses, grads = [], []
    for model, bank in ((late_model, late_bank), (all_model, all_bank)):
        plan = bank.plan_step([(paths, np.array([False, True]))])
        memory = bank.fetch(plan, 0)
        loss = model(tokens, memory=memory).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(memory.grads)
        bank.abandon_step()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name][4:6], grad, rtol=1e-5, atol=1e-7)
        assert not grads[1][name][:4].any(), name
    for i in range(4):  # the anchor's own gradients are the same too
        torch.testing.assert_close(late_model.layers[i].ffn.w_up.weight.grad, all_model.layers[i].ffn.w_up.weight.grad)


class SlotMemory:
    """A memory of `slots` layer slots of random SwiGLU units, recording which slots are read."""

    def __init__(self, kind, batch: int, slots: int, units: int = 5):
        gen = torch.Generator().manual_seed(0)
        self.blocks = [kind.layer_tensors([torch.randn(batch, units, kind.width, generator=gen) for _ in kind.slots])
                       for _ in range(slots)]
        self.read: list[int] = []

    def layer(self, i):
        self.read.append(i)
        return self.blocks[i]


def test_hf_anchor_hooks_only_the_memory_layers(tmp_path):
    from tests.hf_models import save_tiny

    path = save_tiny("llama", tmp_path / "llama", layers=3)
    cfg = load_config("posthoc-tiny", [f"model.hf_path={path}", "data.seq_len=64", "memory.layers=[1]"])
    model = build_model(cfg)
    assert model.memory_layers == (1,)
    assert [bool(layer.mlp._forward_hooks) for layer in model.layers] == [False, True, False]
    memory = SlotMemory(memory_kind(cfg), batch=2, slots=1)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    seen: dict[str, list] = {"plain": [], "memory": []}
    for key, mem in (("plain", None), ("memory", memory)):
        handle = model.layers[0].register_forward_hook(lambda m, args, out, key=key: seen[key].append(out))
        with torch.no_grad():
            seen[key].append(model(tokens, memory=mem))
        handle.remove()
    assert memory.read == [0]
    first = [out[0] if isinstance(out, tuple) else out for out in (seen["plain"][0], seen["memory"][0])]
    assert torch.equal(*first)  # layer 0 has no memory
    assert (seen["memory"][1] - seen["plain"][1]).abs().max() > 1e-3  # layer 1's does change the logits


def test_activations_count_the_memory_units_in_the_memory_layers_only():
    model = small().model
    kw = dict(micro_batch=2, seq_len=16, memory_units=6, fetched=0, value_bytes=2)
    per_memory_layer = 2 * 16 * 2 * 4 * 6  # tokens x bytes x (gate, up, silu, down inputs) x units
    for checkpointing, dropped in ((False, 4 * per_memory_layer), (True, 0)):  # checkpointed: one layer recomputed
        every = activation_bytes(model, **kw, checkpointing=checkpointing)
        assert every == activation_bytes(model, **kw, checkpointing=checkpointing, memory_layers=6)
        assert every - activation_bytes(model, **kw, checkpointing=checkpointing, memory_layers=2) == dropped
