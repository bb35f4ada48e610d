"""Every memory kind (ffn, lora_ffn, lora_qk, lora_ov, kv): sizes by the paper's formulas, no effect at step 0,
and the gradients the bank returns for its rows against autograd through a reference model written here."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmtrain.config import ModelConfig, load_config
from hmtrain.info import size_summary
from hmtrain.memory import MemoryBank
from hmtrain.memory.kind import LORA_ALPHA, kind_from_spec, kind_named
from hmtrain.model import Transformer
from hmtrain.model.transformer import apply_rope

KINDS = ["ffn", "lora_ffn", "lora_qk", "lora_ov", "kv"]
# head_dim * n_heads (12) differs from d_model (16) and ffn_hidden (24): every slot width is tested
TINY = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, head_dim=6, ffn_hidden=24)
BRANCHING, UNITS = (2, 2), (3, 2)


def tiny_kind(name):
    return kind_named(name, d_model=TINY.d_model, ffn_hidden=TINY.ffn_hidden, n_heads=TINY.n_heads,
                      head_dim=TINY.head_dim)


@pytest.mark.parametrize("name, per_unit", [  # params per unit per layer: the formulas divided by r*L
    ("ffn", lambda d, f, hd: 3 * d), ("lora_ffn", lambda d, f, hd: 3 * (d + f)),
    ("lora_qk", lambda d, f, hd: 2 * (d + hd)), ("lora_ov", lambda d, f, hd: 2 * (d + hd)),
    ("kv", lambda d, f, hd: 2 * hd)])
def test_sizes_follow_the_kinds_formulas(name, per_unit):
    cfg = load_config("tiny", [f"memory.kind={name}"])
    m = cfg.model
    expected = per_unit(m.d_model, m.ffn_hidden, m.n_heads * m.head_dim)
    summary = size_summary(cfg)  # what `hmtrain info` prints
    assert summary["fetched"] == m.n_layers * expected * sum(cfg.memory.units)
    nodes = np.cumprod(cfg.tree.branching)
    assert summary["bank"] == m.n_layers * expected * int(np.dot(nodes, cfg.memory.units))
    kind = tiny_kind(name)
    bank = MemoryBank(n_layers=2, kind=kind, branching=BRANCHING, units=UNITS, generic=True)
    assert bank.fetched_parameters() == 2 * kind.params_per_unit * sum(UNITS)
    assert bank.tables["level2"][0].numel() == 2 * kind.params_per_unit * UNITS[1]
    assert kind_from_spec(kind.spec()) == kind


def test_a_bad_kind_is_refused_naming_the_kinds():
    with pytest.raises(ValueError, match="memory.kind.*ffn, lora_ffn, lora_qk, lora_ov or kv.*'lora'"):
        load_config("tiny", ["memory.kind=lora"])


def test_mixed_width_rows_are_flat_and_slots_are_ordered_by_width():
    kind = tiny_kind("lora_ffn")
    assert kind.slots == ("w_gate.A", "w_up.A", "w_down.B", "w_down.A", "w_gate.B", "w_up.B")
    assert kind.groups == ((0, 3, 16), (3, 3, 24)) and kind.row_shape(2, 5) == (2, 5 * 3 * 40)
    assert tiny_kind("kv").row_shape(2, 5) == (2, 2, 5, 12)


@pytest.mark.parametrize("name", KINDS)
def test_a_fresh_memory_changes_nothing_at_step_0(name):
    torch.manual_seed(0)
    model = Transformer(TINY, max_seq_len=16).eval()
    bank = MemoryBank(n_layers=2, kind=tiny_kind(name), branching=BRANCHING, units=UNITS, generic=True,
                      init_std=0.5, seed=3)
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    paths, generic = torch.tensor([[0, 1], [1, 3], [1, 2]]), torch.tensor([False, False, True])
    with torch.no_grad():
        alone = model(tokens)
        assert torch.equal(model(tokens, memory=bank.lookup(paths, generic)), alone)
        for table in bank.tables.values():  # and the memory is read: other rows change the output
            table.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        assert not torch.allclose(model(tokens, memory=bank.lookup(paths, generic)), alone, atol=1e-4)


def slots_of(kind, row, units):
    """The slots of one table row [n_layers, ...] by the documented layout: per layer slot-major, slot s
    holding `units` vectors of its width; a dict per layer of slot name -> [units, width]."""
    flat = row.reshape(row.shape[0], -1)
    layers = []
    for i in range(row.shape[0]):
        start, slots = 0, {}
        for name, width in zip(kind.slots, kind.slot_widths):
            slots[name] = flat[i, start:start + units * width].view(units, width)
            start += units * width
        layers.append(slots)
    return layers


def reference_memory(kind, tables, path, generic):
    """One sequence's memory per layer: its path's blocks side by side along the units (or the generic row)."""
    if generic:
        return slots_of(kind, tables["generic"][0], sum(UNITS))
    levels = [slots_of(kind, tables[f"level{i + 1}"][node], m) for i, (node, m) in enumerate(zip(path, UNITS))]
    return [{s: torch.cat([lv[i][s] for lv in levels]) for s in kind.slots} for i in range(TINY.n_layers)]


def reference_forward(model, tokens, memory, name):
    """The anchor of hmtrain/model/transformer.py for one sequence, with the kind's memory, written out."""
    T, H, hd = len(tokens), TINY.n_heads, TINY.head_dim
    x = model.tok_embeddings(tokens)
    cos, sin = model.rope_cos[None, None, :T], model.rope_sin[None, None, :T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer, mem in zip(model.layers, memory):
        def linear(module, target, h):
            y = h @ module.weight.T
            if name.startswith("lora") and f"{target}.A" in mem:
                A, B = mem[f"{target}.A"], mem[f"{target}.B"].T  # A [r, d_in], B [d_out, r]
                y = y + LORA_ALPHA / A.shape[0] * h @ A.T @ B.T
            return y
        attn, h = layer.attn, layer.attn_norm(x)
        q = attn.q_norm(linear(attn.wq, "wq", h)).view(T, H, hd).transpose(0, 1)
        k = attn.k_norm(linear(attn.wk, "wk", h)).view(T, H, hd).transpose(0, 1)
        v = linear(attn.wv, "wv", h).view(T, H, hd).transpose(0, 1)
        qr, kr = apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0]
        scores = (qr @ kr.transpose(1, 2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        out = scores.softmax(-1) @ v
        if name == "kv":  # every query, without position, over the memory keys: a softmax of their own
            keys, values = (mem[s].view(-1, H, hd).transpose(0, 1) for s in ("key", "value"))
            out = out + (q @ keys.transpose(1, 2) / math.sqrt(hd)).softmax(-1) @ values
        x = x + linear(attn.wo, "wo", out.transpose(0, 1).reshape(T, H * hd))
        ffn, h = layer.ffn, layer.ffn_norm(x)
        if name == "ffn":  # the memory's units join the anchor's hidden units
            gate = h @ torch.cat([ffn.w_gate.weight, mem["gate"]]).T
            up = h @ torch.cat([ffn.w_up.weight, mem["up"]]).T
            x = x + (F.silu(gate) * up) @ torch.cat([ffn.w_down.weight, mem["down"].T], dim=1).T
        else:
            x = x + linear(ffn.w_down, "w_down", F.silu(linear(ffn.w_gate, "w_gate", h)) *
                           linear(ffn.w_up, "w_up", h))
    return model.output(model.norm(x))


@pytest.mark.parametrize("name", KINDS)
def test_row_gradients_match_autograd_through_a_reference(name):
    torch.manual_seed(0)
    model = Transformer(TINY, max_seq_len=16)
    kind = tiny_kind(name)
    bank = MemoryBank(n_layers=2, kind=kind, branching=BRANCHING, units=UNITS, generic=True, seed=1)
    gen = torch.Generator().manual_seed(4)
    for table in bank.tables.values():  # non-zero everywhere (a fresh B or value slot would hide terms)
        table.copy_(torch.randn(table.shape, generator=gen) * 0.3)
    reference = {n: t.detach().clone().requires_grad_() for n, t in bank.tables.items()}
    paths, generic = np.array([[0, 1], [1, 3], [0, 1], [1, 2]]), np.array([False, False, False, True])
    tokens = torch.randint(0, 50, (4, 7), generator=gen)
    weights = torch.randn(4, 7, 50, generator=gen)  # the loss: a fixed random projection of the logits

    plan = bank.plan_step([(paths, generic)])
    fetched = bank.fetch(plan, 0)
    (model(tokens, memory=fetched) * weights).sum().backward()
    bank.return_grads(fetched)
    bank.finish_grads()

    model.zero_grad()
    total = 0
    for b in range(4):
        memory = reference_memory(kind, reference, paths[b], generic[b])
        total = total + (reference_forward(model, tokens[b], memory, name) * weights[b]).sum()
    total.backward()
    for table, rows in plan.step_rows.items():
        want = reference[table].grad[rows]
        assert want.abs().max() > 0
        torch.testing.assert_close(bank._grads[table], want, rtol=1e-4, atol=1e-5)


def test_the_bank_updates_a_mixed_width_kind_and_a_step_changes_the_output():
    """One sparse AdamW step on a LoRA bank: the touched rows move, the model's output changes."""
    model = Transformer(TINY, max_seq_len=16)
    bank = MemoryBank(n_layers=2, kind=tiny_kind("lora_ffn"), branching=BRANCHING, units=UNITS, generic=True)
    before = {n: t.clone() for n, t in bank.tables.items()}
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    paths = np.array([[0, 1], [1, 2]])
    plan = bank.plan_step([(paths, None)])
    fetched = bank.fetch(plan, 0)
    model(tokens, memory=fetched).square().mean().backward()
    bank.return_grads(fetched)
    bank.finish_grads()
    assert bank.step(lr=1e-2) == {"level1": 2, "level2": 2, "generic": 0}
    moved = (bank.tables["level2"] != before["level2"]).flatten(1).any(1)
    assert moved.tolist() == [False, True, True, False]
    with torch.no_grad():
        assert not torch.equal(model(tokens, memory=bank.lookup(torch.from_numpy(paths))), model(tokens))


def test_memory_kind_comes_from_the_config():
    cfg = load_config("tiny", ["memory.kind=kv"])
    kind = kind_from_spec({"name": "kv", "n_heads": cfg.model.n_heads, "head_dim": cfg.model.head_dim})
    from hmtrain.memory.kind import memory_kind
    assert memory_kind(cfg) == kind
    assert memory_kind(dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, kind="ffn"))).name == "ffn"
