"""Held-out perplexity and multiple-choice probe scoring, for one model variant.

A variant is how memory is chosen for a sequence (the paper's comparison):
  "fetched"  the blocks on the sequence's routed path
  "generic"  the context-free memory of the same size (the paper's control)
  "none"     the anchor alone (or a dense baseline)
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm import tqdm

from hmtrain.memory import MemoryBank
from hmtrain.memory.read_only import ReadOnlyBank
from hmtrain.model import Transformer, lm_loss
from hmtrain.model.choices import choice_logprobs as score_choices
from hmtrain.util.labels import IGNORE_INDEX

VARIANTS = ("fetched", "generic", "none")
Bank = Union[MemoryBank, ReadOnlyBank]  # what a lookup reads: a checkpoint's weights, an export, a live bank


def fetch_for(bank: Optional[Bank], variant: str, paths: Tensor):
    if variant not in VARIANTS:
        raise ValueError(f"unknown memory variant {variant!r}; expected one of {VARIANTS}")
    if variant == "none":
        return None
    if bank is None:
        raise ValueError(f"variant {variant!r} needs a memory bank, and this checkpoint has none")
    use_generic = torch.full((paths.shape[0],), variant == "generic")
    return bank.lookup(paths, use_generic)


@torch.no_grad()
def heldout_perplexity(model: Transformer, bank: Optional[Bank], batches: Iterable[dict], variant: str,
                       device: torch.device, max_sequences: int = 0) -> dict:
    """Token-level perplexity over held-out packed sequences, memory routed by their documents' path;
    also per level-1 subtree (`subtrees`: {"node": {perplexity, nll, tokens}}), to show where memory helps.
    Subtree keys are strings in node order, as they are after the JSON round trip of `eval --out`, so the
    results in memory and on disk read the same way."""
    nll, tokens, sequences = 0.0, 0, 0
    per_node: dict[int, list[float]] = {}  # node -> [nll sum, tokens]
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        memory = fetch_for(bank, variant, batch["paths"])
        logits = model(batch["tokens"], segments=batch["segments"], memory=memory)
        row_nll = lm_loss(logits, batch["labels"], reduction="none").view(batch["labels"].shape).sum(1)
        row_tokens = (batch["labels"] != IGNORE_INDEX).sum(1)
        nll += float(row_nll.sum())
        tokens += int(row_tokens.sum())
        for node, n, t in zip(batch["paths"][:, 0].tolist(), row_nll.tolist(), row_tokens.tolist()):
            acc = per_node.setdefault(int(node), [0.0, 0])
            acc[0] += n
            acc[1] += t
        sequences += batch["tokens"].shape[0]
        if max_sequences and sequences >= max_sequences:
            break
    if tokens == 0:
        raise ValueError("held-out split has no tokens to score")
    subtrees = {str(node): {"perplexity": math.exp(s / t), "nll": s / t, "tokens": t}
                for node, (s, t) in sorted(per_node.items()) if t}
    return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "subtrees": subtrees}


@torch.no_grad()
def choice_logprobs(model: Transformer, bank: Optional[Bank], variant: str, prompts: Sequence[list[int]],
                    choices: Sequence[list[int]], paths: Tensor, pad_id: int, device: torch.device,
                    batch_size: int = 64, progress: str = "") -> Tensor:
    """Sum of log p(choice tokens | prompt) for each (prompt, choice) pair; paths route the memory
    (hmtrain/model/choices.py, the scorer validation during training uses too). `progress`: a bar with
    that title over the batches (none when empty)."""
    def forward(tokens: Tensor, batch_paths: Tensor) -> Tensor:
        return model(tokens, memory=fetch_for(bank, variant, batch_paths.to(device)))

    with tqdm(total=-(-len(prompts) // batch_size), desc=progress, unit="batch", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        return score_choices(forward, prompts, choices, paths, pad_id, device, batch_size=batch_size, bar=bar)
