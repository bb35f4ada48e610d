"""The model reaches the kernels through `model.ffn_impl`: both implementations train the same."""
import dataclasses

import torch

from hmtrain.config import ModelConfig
from hmtrain.memory import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.model import Transformer, lm_loss

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, head_dim=16, ffn_hidden=40)


def make_bank(device):
    bank = MemoryBank(n_layers=2, kind=SwiGLUUnits(d_model=32), branching=[2, 2], units=[3, 2], device=device, seed=1)
    gen = torch.Generator().manual_seed(2)
    for table in bank.tables.values():  # non-zero down rows, so the memory path matters
        table[:, :, 2] = (0.1 * torch.randn(table[:, :, 2].shape, generator=gen)).to(device)
    return bank


def test_triton_and_torch_ffn_train_the_same(device):
    torch.manual_seed(0)
    reference = Transformer(dataclasses.replace(CFG, ffn_impl="torch"), max_seq_len=16).to(device)
    fused = Transformer(dataclasses.replace(CFG, ffn_impl="triton"), max_seq_len=16).to(device)
    fused.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 61, (3, 11), device=device)
    paths = torch.tensor([[0, 1], [1, 2], [1, 3]], device=device)
    outcomes = []
    for model in (reference, fused):
        bank = make_bank(device)
        plan = bank.plan_step([(paths, None)])
        fetched = bank.fetch(plan, 0)
        loss = lm_loss(model(tokens, memory=fetched), tokens)
        loss.backward()
        bank.return_grads(fetched)
        outcomes.append((loss.detach(), model.layers[0].ffn.w_gate.weight.grad, bank.finish_grads().sqrt()))
    (loss_a, grad_a, norm_a), (loss_b, grad_b, norm_b) = outcomes
    assert norm_a > 0
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norm_a, norm_b, rtol=1e-4, atol=1e-6)
