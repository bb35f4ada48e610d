"""`hmtrain generate`: route a prompt, fetch its path's memory, and continue it with the anchor.

The prompt is embedded with the embedder the data was prepared with and routed down the same
tree (greedy nearest-centroid descent, as training paths were), so it gets the memory blocks of
the documents it resembles. The model is read from an export (hmtrain/serve/export.py; the bank
through memory maps, only the path's rows) or from a checkpoint (the bank's weights in host memory,
only the path's rows copied to the device). The anchor is hmtrain's Transformer or an open-weight HF
model (`model.family=hf`; an export's `anchor/`, read with transformers), which takes the fetched
memory in its MLPs through the same hooks as in training (hmtrain/model/hf_anchor.py).

Decoding re-runs the full context every token (no KV cache: the models this runs on CPU are
tiny); the context keeps its last `max_seq_len` tokens. Temperature 0 is greedy; otherwise
top-k sampling from a generator seeded with `seed`, so a seed fixes the text. Ids the tokenizer
does not have (vocabulary padding) and PAD are never produced; EOT ends the text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from hmtrain.checkpoint.resume import check_data_fingerprints
from hmtrain.checkpoint.verify import CONFIG_FILE
from hmtrain.config import load_config
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.embed import build_embedder
from hmtrain.data.routing.tree import Tree
from hmtrain.data.tokenizer import Tokenizer
from hmtrain.eval.loading import load_trained, read_checkpoint
from hmtrain.memory.read_only import ReadOnlyBank
from hmtrain.model import HFAnchor, Transformer
from hmtrain.serve.export import Export

MEMORY_MODES = ("fetched", "generic", "none")


@dataclass
class Generated:
    path: list[int]  # the prompt's routed node per level
    memory: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # the continuation only
    stopped_at_eot: bool


@dataclass
class GenerationModel:
    model: Transformer | HFAnchor
    tokenizer: Tokenizer
    tree: Tree
    embedder_name: str
    bank: Optional[ReadOnlyBank]  # an export's MappedBank or a checkpoint's HostBank
    source: str  # what it was loaded from, for the output
    step: int
    device: torch.device

    def route(self, text: str) -> Tensor:
        """[1, L] path of `text` through the tree, embedded with the data's embedder."""
        if "_embedder" not in self.__dict__:
            self.__dict__["_embedder"] = build_embedder(self.embedder_name, dim=self.tree.dim)
        return self.tree.route(self.__dict__["_embedder"].embed([text]))

    def memory_for(self, path: Tensor, memory: str):
        """The fetched memory of one sequence on `path` (or the generic row, or None for the anchor alone)."""
        if memory not in MEMORY_MODES:
            raise ValueError(f"--memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if memory == "none":
            return None
        if self.bank is None:
            raise ValueError(f"--memory {memory}: {self.source} has no memory bank (trained without memory); "
                             "use --memory none")
        if memory == "generic" and not self.bank.has_generic:
            raise ValueError(f"--memory generic: {self.source} has no generic memory (trained with "
                             "memory.generic=false); use --memory fetched or none")
        return self.bank.lookup(path.to(self.device), torch.tensor([memory == "generic"], device=self.device))

    @torch.no_grad()
    def next_logits(self, ids: list[int], memory) -> Tensor:
        """fp32 logits [vocab] for the token after `ids` (the last max_seq_len of them)."""
        context = ids[-self.model.max_seq_len:]
        tokens = torch.tensor([context], dtype=torch.long, device=self.device)
        return self.model(tokens, memory=memory)[0, -1].float()

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0, memory: str = "fetched") -> Generated:
        check_sampling(max_new_tokens, temperature, top_k)
        if not prompt.strip():
            raise ValueError("--prompt is empty: give some text to route and continue")
        prompt_ids = self.tokenizer.encode(prompt)
        path = self.route(prompt)
        fetched = self.memory_for(path, memory)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        usable = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool)
        usable[:self.tokenizer.vocab_size] = True  # rows beyond the tokenizer are vocabulary padding
        usable[self.tokenizer.pad_id] = False
        ids, new, stopped = list(prompt_ids), [], False
        for _ in range(max_new_tokens):
            logits = self.next_logits(ids, fetched).cpu().masked_fill(~usable, float("-inf"))
            token = pick(logits, temperature, top_k, generator)
            if token == self.tokenizer.eot_id:
                stopped = True
                break
            ids.append(token)
            new.append(token)
        return Generated(path=path[0].tolist(), memory=memory, prompt_ids=prompt_ids, new_ids=new,
                         text=self.tokenizer.decode(new), stopped_at_eot=stopped)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and temperature != float("inf")):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: no limit), got {top_k}")


def pick(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """Greedy at temperature 0 (ties to the lowest id); else sample from the top-k of softmax(logits / T)."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def from_export(root: str | Path, device: str | torch.device = "cpu") -> GenerationModel:
    export = Export.open(root)
    device = torch.device(device)
    return GenerationModel(model=export.load_model(device), tokenizer=export.tokenizer, tree=export.tree,
                           embedder_name=export.embedder, bank=export.bank(device), source=f"export {export.root}",
                           step=export.step, device=device)


def from_checkpoint(checkpoint: str | Path, config: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (),
                    device: str | torch.device = "cpu") -> GenerationModel:
    """A checkpoint, with the tree and tokenizer of `data.prepared` (from `config` + `overrides` when given,
    overrides alone applying to the checkpoint's own config; else the checkpoint's config)."""
    device = torch.device(device)
    path, record, cfg = read_checkpoint(checkpoint, hint="generate with it via --checkpoint")
    data_cfg = cfg if config is None and not overrides else load_config(config or path / CONFIG_FILE, overrides)
    # the data first: a wrong data.prepared fails before the bank is loaded
    data = PreparedData.open(data_cfg.data.prepared, verify="checksums" if data_cfg.data.verify_checksums else "sizes")
    data.check_compatible(cfg)
    check_data_fingerprints(path, record, data.fingerprints(), data.root)
    trained = load_trained(path, device)
    return GenerationModel(model=trained.model, tokenizer=data.tokenizer, tree=data.tree,
                           embedder_name=data.manifest["embedder"], bank=trained.bank,
                           source=f"checkpoint {trained.path}", step=trained.step, device=device)


def format_result(result: Generated, prompt: str) -> str:
    path = "/".join(str(node) for node in result.path)
    end = " [eot]" if result.stopped_at_eot else ""
    return f"path: {path} (memory: {result.memory})\n{prompt}{result.text}{end}"
