"""Probe scoring and held-out perplexity against hand computations."""
import math

import torch

from hmtrain.config import ModelConfig
from hmtrain.eval.scoring import choice_logprobs, heldout_perplexity
from hmtrain.memory import MemoryBank
from hmtrain.memory.kind import SwiGLUUnits
from hmtrain.model import Transformer

CFG = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, head_dim=8, ffn_hidden=24)


def model_and_bank():
    torch.manual_seed(0)
    model = Transformer(CFG, max_seq_len=32).eval()
    bank = MemoryBank(n_layers=2, kind=SwiGLUUnits(d_model=16), branching=(2, 2), units=(3, 2), seed=1)
    gen = torch.Generator().manual_seed(2)
    for table in bank.tables.values():  # trained-looking down rows, so memory changes the scores
        table[:, :, 2] = torch.randn(table[:, :, 2].shape, generator=gen)
    return model, bank


def by_hand(model, bank, prompt, choice, path, variant):
    tokens = torch.tensor([prompt + choice])
    memory = None
    if variant != "none":
        memory = bank.lookup(torch.tensor([path]), torch.tensor([variant == "generic"]))
    logprobs = torch.log_softmax(model(tokens, memory=memory)[0].float(), dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + j, tok]) for j, tok in enumerate(choice))


def test_choice_logprobs_equal_the_hand_sum_with_padding_and_batches():
    model, bank = model_and_bank()
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [3, 4, 5]]
    choices = [[12, 13], [14, 15, 16], [17], [20, 21]]
    paths = torch.tensor([[0, 1], [1, 2], [1, 3], [0, 0]])
    for variant in ("fetched", "generic", "none"):
        got = choice_logprobs(model, bank, variant, prompts, choices, paths, pad_id=0, device=torch.device("cpu"),
                              batch_size=3)  # batches of 3 and 1: padding and a ragged last batch
        want = [by_hand(model, bank, p, c, path.tolist(), variant) for p, c, path in zip(prompts, choices, paths)]
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    fetched = choice_logprobs(model, bank, "fetched", prompts, choices, paths, 0, torch.device("cpu"))
    alone = choice_logprobs(model, bank, "none", prompts, choices, paths, 0, torch.device("cpu"))
    assert not torch.allclose(fetched, alone)  # the memory really takes part


def test_heldout_perplexity_is_exp_of_the_mean_token_nll():
    model, bank = model_and_bank()
    tokens = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = tokens.roll(-1, dims=1)
    labels[0, 7:] = -100  # padding is not counted
    batch = {"tokens": tokens, "labels": labels, "segments": torch.zeros_like(tokens),
             "paths": torch.tensor([[0, 1], [1, 3]])}
    result = heldout_perplexity(model, bank, [batch], "fetched", torch.device("cpu"))
    memory = bank.lookup(batch["paths"], torch.tensor([False, False]))
    logprobs = torch.log_softmax(model(tokens, segments=batch["segments"], memory=memory).float(), dim=-1)
    nll = [-float(logprobs[b, t, labels[b, t]]) for b in range(2) for t in range(10) if labels[b, t] != -100]
    assert result["tokens"] == len(nll) == 17
    assert math.isclose(result["perplexity"], math.exp(sum(nll) / len(nll)), rel_tol=1e-5)
