"""The check of an HF anchor's export: transformers reads `anchor/` back to the trained anchor's logits, and
`hmtrain generate` from the export continues a prompt as the checkpoint's model does (tests of the post-hoc
recipe, tests/e2e/test_hf_posthoc.py and tests/unit/test_hf_memory_phase.py)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hmtrain.eval.loading import load_trained
from hmtrain.serve.export import Export
from hmtrain.serve.generate import from_export

PROMPT = "She was born in the city of"


def greedy_in_process(trained, tokenizer, path: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation of PROMPT by the checkpoint's model with the checkpoint bank's fetched memory."""
    memory = trained.bank.lookup(path, torch.tensor([False]))
    ids, new = tokenizer.encode(PROMPT), []
    with torch.no_grad():
        for _ in range(n):
            logits = trained.model(torch.tensor([ids]), memory=memory)[0, -1]
            logits[tokenizer.vocab_size:] = float("-inf")  # vocabulary padding
            logits[tokenizer.pad_id] = float("-inf")
            token = int(logits.argmax())
            if token == tokenizer.eot_id:
                break
            ids.append(token)
            new.append(token)
    return new


def check_hf_export(run: Path, out: Path, source: Path) -> dict:
    """transformers reads the exported anchor to the trained anchor's logits; generate from the export with
    fetched memory continues as the in-process model with the same memory. Returns the exported weights."""
    trained = load_trained(run)
    export = Export.open(out, checksums=True)
    assert export.manifest["model"]["family"] == "hf" and export.manifest["bank"] is not None
    assert (out / "anchor" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    reference = AutoModelForCausalLM.from_pretrained(out / "anchor", local_files_only=True).eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(tokens).logits
        torch.testing.assert_close(trained.model(tokens), theirs, rtol=0, atol=1e-5)  # the anchor alone

    served = from_export(out)
    path = served.route(PROMPT)
    ids = served.tokenizer.encode(PROMPT)
    fetched = served.memory_for(path, "fetched")
    with torch.no_grad():
        torch.testing.assert_close(served.model(tokens), theirs, rtol=0, atol=1e-5)
    with_memory = served.next_logits(ids, fetched)
    assert not torch.allclose(with_memory, served.next_logits(ids, None)), "the memory is not attached"
    memory = trained.bank.lookup(path, torch.tensor([False]))
    with torch.no_grad():
        torch.testing.assert_close(with_memory, trained.model(torch.tensor([ids]), memory=memory)[0, -1])
    result = served.generate(PROMPT, max_new_tokens=8)
    assert result.new_ids == greedy_in_process(trained, served.tokenizer, path, 8)
    return load_file(out / "anchor" / "model.safetensors")
