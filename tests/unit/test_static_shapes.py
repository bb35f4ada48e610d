"""One micro-batch shape per run under owner placement: compiled code compiles once, and the padding
rows that make the shape fetch no memory and change no loss, token count or gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from hmtrain.config import ModelConfig
from hmtrain.data.loading.batch import make_batch, pad_batch, real_rows
from hmtrain.data.loading.loader import StepLoader
from hmtrain.memory.bank import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.model.transformer import Transformer
from hmtrain.util.labels import IGNORE_INDEX
from tests.unit.prepared_helper import EOT, PAD, make_prepared

SEQ_LEN = 6
TINY = ModelConfig(vocab_size=100, d_model=16, n_layers=1, n_heads=2, head_dim=8, ffn_hidden=24)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # level-1 nodes hold 9, 9 and 4 sequences: owner placement gives the two ranks unequal shares
    counts = {(0, 0): 5, (0, 1): 4, (1, 2): 6, (1, 3): 3, (2, 4): 2, (2, 5): 2}
    return make_prepared(tmp_path_factory.mktemp("prepared"), counts, branching=[3, 2], seq_len=SEQ_LEN,
                         interleave=True)


def test_owner_placed_micro_batches_compile_once(data):
    """FlexAttention is compiled with dynamic=False (hmtrain/model/attention.py): every new batch size would
    compile again, and after 8 dynamo gives up and runs unfused attention. The same setting on the whole
    forward, over 6 steps of both ranks' micro-batches, must compile only for the first."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model = Transformer(TINY, max_seq_len=SEQ_LEN).eval()
    compiled = torch.compile(model, backend=counter, dynamic=False)
    sizes = set()
    with torch.no_grad():
        for rank in range(2):
            loader = StepLoader(data, "train", global_batch=12, micro_batches=2, seed=3, rank=rank, world_size=2,
                                owner_of_subtree=[0, 1, 0])
            for _, (micro, _) in zip(range(6), loader):
                for mb in micro:
                    compiled(mb["tokens"], segments=mb["segments"], labels=mb["labels"])
                    if not sizes:
                        first = counter.frame_count
                    sizes.add(real_rows(mb))
    assert len(sizes) > 1  # the ranks' shares did vary ...
    assert counter.frame_count == first  # ... and nothing compiled again
    torch._dynamo.reset()


def _bank() -> MemoryBank:
    bank = MemoryBank(n_layers=1, kind=SwiGLUUnits(d_model=16), branching=(3, 2), units=(2, 2), generic=True,
                      init_std=0.5, seed=1, placement="owner")
    gen = torch.Generator().manual_seed(2)
    for table in bank.tables.values():  # non-zero down rows: the memory changes the loss
        table.copy_(torch.randn(table.shape, generator=gen))
    return bank


def _step(model: Transformer, bank: MemoryBank, mb: dict, generic: np.ndarray) -> tuple:
    """One training micro-batch as train_step runs it: plan the sequences, fetch for every row, backward."""
    n = real_rows(mb)
    plan = bank.plan_step([(mb["paths"][:n], generic)])
    memory = bank.fetch(plan, 0, padded_to=len(mb["tokens"]))
    loss, count = model(mb["tokens"], segments=mb["segments"], memory=memory, labels=mb["labels"])
    loss.backward()
    bank.return_grads(memory)
    squared = bank.finish_grads()
    bank.step(lr=1e-2)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), int(count), squared, plan.stats, grads, memory


def test_padding_rows_fetch_nothing_and_change_no_gradient():
    rng = np.random.default_rng(0)
    samples = [(rng.integers(2, 100, SEQ_LEN + 1), path) for path in ([0, 1], [2, 4], [0, 0])]
    samples[1][0][3] = EOT  # two documents in one row
    real = make_batch(samples, eot_id=EOT, pad_id=PAD, index=[5, 9, 11])
    padded = pad_batch(real, 5, PAD)
    generic = np.array([False, True, False])
    results = []
    for mb in (real, padded):
        torch.manual_seed(0)
        model, bank = Transformer(TINY, max_seq_len=SEQ_LEN), _bank()
        results.append((*_step(model, bank, mb, generic), bank.tables))
    (loss, count, squared, stats, grads, _, tables), (p_loss, p_count, p_squared, p_stats, p_grads, memory,
                                                      p_tables) = results
    assert p_count == count == int((real["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(p_loss, loss)
    torch.testing.assert_close(p_squared, squared)  # the bank's gradients ...
    assert p_stats == stats  # ... of the same rows: padding fetched none
    for name in grads:  # the anchor's
        torch.testing.assert_close(p_grads[name], grads[name], msg=name)
    for name in tables:  # the rows the step updated
        torch.testing.assert_close(p_tables[name], tables[name], msg=name)
    gate, up, down = memory.layer(0)
    assert gate.shape[0] == up.shape[0] == down.shape[0] == 5
    assert not gate[3:].any() and not up[3:].any() and not down[3:].any()  # a memory that adds nothing
