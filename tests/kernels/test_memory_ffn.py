"""memory_ffn: the Triton kernels (interpreted on CPU) against the PyTorch reference."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hmtrain_kernels
from hmtrain_kernels import memory_ffn, memory_ffn_torch, resolve_impl

REPO = Path(__file__).resolve().parents[2]
NAMES = ("x", "w_gate", "w_up", "w_down", "u_gate", "u_up", "u_down")
# B, T, d, h, M: none a multiple of the interpreter's 16-wide blocks unless noted
SHAPES = [
    (2, 18, 20, 36, 10),
    (3, 5, 17, 33, 0),   # no memory units
    (1, 33, 16, 16, 1),  # one memory unit; d and h exactly one block
    (2, 1, 8, 20, 5),    # one token; d narrower than a block
]


def make_inputs(shape, dtype, device, seed: int) -> list[torch.Tensor]:
    """Inputs scaled like an initialised layer so anchor and memory terms are both O(1)."""
    B, T, d, h, M = shape
    gen = torch.Generator().manual_seed(seed)
    sizes = [((B, T, d), 1), ((h, d), d), ((h, d), d), ((d, h), h), ((B, M, d), d), ((B, M, d), d),
             ((B, d, M), max(M, 1))]
    return [(torch.randn(s, generator=gen) / fan_in ** 0.5).to(device, dtype).requires_grad_()
            for s, fan_in in sizes]


def run(impl: str, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor | None]:
    """Output, then the gradient of <y, dy> for each input (None where it needs none)."""
    for t in inputs:
        t.grad = None
    y = memory_ffn(*inputs, impl=impl)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in inputs]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        assert got.shape == ref.shape
        return 0.0
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, got.dtype, ref.dtype)
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def poison(monkeypatch):
    """Fill every kernel output with NaN before the kernels run, so unwritten elements fail.

    Returns the list of (shape, dtype) allocated, so tests can check which buffers were made.
    """
    from hmtrain_kernels import memory_ffn_triton

    allocated = []

    def nan_empty(shape, like, dtype=None):
        allocated.append((tuple(shape), dtype or like.dtype))
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)

    monkeypatch.setattr(memory_ffn_triton, "_empty", nan_empty)
    if not torch.cuda.is_available():
        assert memory_ffn_triton.INTERPRET, "kernels compiled for GPU: conftest must set TRITON_INTERPRET"
    return allocated


@pytest.mark.parametrize("seed", [11, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_forward_and_all_grads(shape, dtype, seed, device, poison):
    inputs = make_inputs(shape, dtype, device, seed)
    dy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    exact = run("torch", [t.detach().double().requires_grad_() for t in inputs], dy.double())
    before = [t.detach().clone() for t in inputs]
    got = run("triton", inputs, dy)
    assert len(poison) >= 2  # the outputs really were poisoned
    assert all(torch.equal(t.detach(), b) for t, b in zip(inputs, before)), "an input was overwritten"
    if dtype == torch.float32:
        tols = [2e-5] * 8
    else:  # loose: twice what the bf16 eager reference loses, plus a floor for tiny tensors
        eager = run("torch", inputs, dy)
        tols = [2 * rel_err(e.double(), x) + 3e-2 for e, x in zip(eager, exact)]
    for name, g, x, tol in zip(("y",) + NAMES, got, exact, tols):
        assert g is not None, name
        assert g.dtype == dtype, name
        err = rel_err(g.double(), x)
        assert err <= tol, f"{name}: max error {err:.2e} of its max > {tol:.1e} (shape {shape}, seed {seed})"


def test_shared_weight_grads_split_over_rows(device, poison, monkeypatch):
    """The split reduction of dW (fp32 partials, then a sum) covers every row exactly once."""
    from hmtrain_kernels import memory_ffn_triton

    monkeypatch.setattr(memory_ffn_triton, "anchor_splits", lambda *a: 3)
    shape = (2, 20, 16, 20, 6)  # 40 rows -> 3 slices of 16, 16, 8
    inputs = make_inputs(shape, torch.float32, device, seed=1)
    dy = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(101)).to(device)
    exact = run("torch", [t.detach().double().requires_grad_() for t in inputs], dy.double())
    got = run("triton", inputs, dy)
    assert ((3, 16, 20), torch.float32) in poison and ((3, 20, 16), torch.float32) in poison
    for name, g, x in zip(("y",) + NAMES, got, exact):
        assert rel_err(g.double(), x) <= 2e-5, name


@pytest.mark.parametrize("trainable", [
    ("x", "u_gate", "u_up", "u_down"),      # frozen anchor: the paper's memory phase
    ("u_gate", "u_up", "u_down"),
    ("x", "w_gate", "w_up", "w_down"),      # memory frozen
    ("w_down", "u_down"),                   # no gate/up gradient at all
    ("w_gate", "u_up"),                     # half of each gate/up pair
], ids=["frozen-anchor", "memory-only", "frozen-memory", "down-only", "gate-and-up-halves"])
def test_only_requested_grads(trainable, device, poison):
    shape = (2, 7, 16, 24, 9)
    inputs = make_inputs(shape, torch.float32, device, seed=2)
    for name, t in zip(NAMES, inputs):
        t.requires_grad_(name in trainable)
    before = [t.detach().clone() for t in inputs]
    dy = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(102)).to(device)
    exact = run("torch", [t.detach().double().requires_grad_(t.requires_grad) for t in inputs], dy.double())
    got = run("triton", inputs, dy)
    for name, t, b in zip(NAMES, inputs, before):
        assert torch.equal(t.detach(), b), f"{name} was overwritten by the kernels"
    for name, g, x in zip(("y",) + NAMES, got, exact):
        if name != "y" and name not in trainable:
            assert g is None, name
        else:
            assert rel_err(g.double(), x) <= 2e-5, name


def test_forward_without_grad(device, poison):
    inputs = [t.detach() for t in make_inputs((2, 9, 16, 20, 6), torch.float32, device, seed=3)]
    with torch.no_grad():
        y = memory_ffn(*inputs, impl="triton")
    assert len(poison) == 2  # only a and y: g and u are not kept without autograd
    assert rel_err(y.double(), memory_ffn_torch(*[t.double() for t in inputs])) <= 2e-5


def test_autocast_casts_fp32_master_weights(device):
    """Under bf16 autocast fp32 inputs run in bf16 and fp32 parameters get fp32 gradients."""
    inputs = make_inputs((2, 5, 16, 20, 6), torch.float32, device, seed=6)
    outs = []
    for impl in ("torch", "triton"):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = memory_ffn(*inputs, impl=impl)
        grads = torch.autograd.grad(y.float().sum(), inputs)
        assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads), impl
        outs.append([y, *grads])
    for name, got, ref in zip(("y",) + NAMES, outs[1], outs[0]):
        assert rel_err(got.double(), ref.double()) <= 5e-2, name


def test_reference_is_the_concatenated_ffn_of_design_md():
    """y_b = [W_down | U_down_b] (silu([W_gate; U_gate_b] x_b) * [W_up; U_up_b] x_b), per sequence."""
    x, wg, wu, wd, ug, uu, ud = (t.detach().double() for t in make_inputs((3, 6, 8, 10, 4), torch.float32,
                                                                           "cpu", seed=4))
    y = memory_ffn_torch(x, wg, wu, wd, ug, uu, ud)
    for b in range(3):
        gate, up = torch.cat([wg, ug[b]]), torch.cat([wu, uu[b]])
        down = torch.cat([wd, ud[b]], dim=1)
        expect = (torch.nn.functional.silu(x[b] @ gate.T) * (x[b] @ up.T)) @ down.T
        torch.testing.assert_close(y[b], expect)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad, match", [
    ({"w_up": (11, 8)}, r"w_up must have shape \(10, 8\), got \(11, 8\)"),
    ({"w_down": (8, 9)}, r"w_down must have shape \(8, 10\), got \(8, 9\)"),
    ({"u_gate": (3, 4, 8)}, r"u_gate must be \[B, M, d\] = \[2, M, 8\].*got \(3, 4, 8\)"),
    ({"u_up": (2, 5, 8)}, r"u_up must have shape \(2, 4, 8\), got \(2, 5, 8\)"),
    ({"u_down": (2, 4, 8)}, r"u_down must have shape \(2, 8, 4\), got \(2, 4, 8\)"),
    ({"x": (2, 6)}, r"x must be \[B, T, d\], got shape \(2, 6\)"),
])
def test_mismatched_shapes_name_the_shapes(impl, bad, match, device):
    shapes = {"x": (2, 6, 8), "w_gate": (10, 8), "w_up": (10, 8), "w_down": (8, 10),
              "u_gate": (2, 4, 8), "u_up": (2, 4, 8), "u_down": (2, 8, 4)} | bad
    with pytest.raises(ValueError, match=match):
        memory_ffn(*[torch.zeros(shapes[n], device=device) for n in NAMES], impl=impl)


def test_mixed_dtypes_are_rejected(device):
    inputs = [t.detach() for t in make_inputs((1, 2, 8, 8, 2), torch.float32, device, seed=5)]
    inputs[3] = inputs[3].bfloat16()
    with pytest.raises(ValueError, match="share one dtype.*w_down"):
        memory_ffn(*inputs, impl="torch")


def test_auto_takes_the_torch_path_on_every_device(monkeypatch):
    """Until a GPU benchmark shows the Triton kernels correct and faster, auto never picks them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(hmtrain_kernels, "_triton_import_error", lambda: None)  # triton imports
    for device in ("cpu", "cuda", "cuda:1", torch.device("cuda", 0)):
        assert resolve_impl("auto", device) == "torch", device
    assert resolve_impl("triton", "cuda") == "triton"  # still selectable explicitly


def test_resolve_impl(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl("torch", cuda) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", cpu)
    with pytest.raises(RuntimeError, match="device meta"):
        resolve_impl("triton", torch.device("meta"))
    with pytest.raises(ValueError, match="'cutlass'"):
        resolve_impl("cutlass", cpu)
    monkeypatch.setattr(hmtrain_kernels, "_triton_import_error", lambda: "ImportError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="needs triton, which cannot be imported"):
        resolve_impl("triton", cuda)


def test_benchmark_smoke_mode_prints_table_without_importing_triton():
    """``python -m hmtrain.bench.memory_ffn --device cpu --quick`` runs the torch impls on CPU,
    and neither it nor ``import hmtrain_kernels`` pulls in triton (one subprocess: python start-up is slow)."""
    code = ("import runpy, sys\n"
            "sys.argv = ['bench_memory_ffn', '--device', 'cpu', '--quick', '--presets', 'tiny-odd']\n"
            "runpy.run_module('hmtrain.bench.memory_ffn', run_name='__main__')\n"
            "assert 'triton' not in sys.modules, 'impl=torch imported triton'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:2] == ["preset", "impl"] for line in lines), out.stdout
    for impl in ("torch eager", "dense GEMM ceiling"):
        assert any(line.startswith("tiny-odd") and impl in line for line in lines), out.stdout
