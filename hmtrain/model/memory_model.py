"""Encoder-decoder memory models (Badger 2026, arXiv 2602.13466): each chunk of a sequence becomes one vector.

A sequence of s x n tokens is cut into s chunks (hmtrain/model/objectives.py). The encoder (token
embedding, causal blocks, final norm) turns a chunk into one vector: its state at the last position.
The decoder of chunk c reads one row

    [m_0, ..., m_{c-1}, f, ..., f, y_0, ..., y_{n-1}]      s slots, then the chunk's n tokens

where m_i are the memories of the earlier chunks (projected to the decoder's width), f a learned filler
vector, and y the chunk's tokens; under a causal mask the output at slot s-1 emits the chunk's first
target and the output at token j its (j+1)-th. A row holds no token of any other chunk, so chunk c
learns about chunks 0..c-1 only through their memories; all chunks run in parallel as separate rows,
without recurrence. `memory_model.context` gives the two controls:
  none  every slot is the filler (the same decoder with no memory)
  full  no chunking: one causal row [f, y_0 .. y_{T-1}] over the whole sequence (full context)

The autoencoder (objective `autoencode`) is the retention probe's own training: the encoder's vector,
expanded over n positions (repeat | unrolled, hmtrain/model/stacks.py), feeds a decoder that emits
the chunk's tokens unshifted. Its decoder is a separate stack, so one config can pretrain an
autoencoder and then train the memory decoder on the same encoder (the curriculum,
hmtrain/train/recipe.py, applied through `set_stage`).

Every block (encoder, decoder, autoencoder decoder, in that order) is in `self.layers`, the list
hmtrain/parallel/parallelize.py wraps; the stacks are slices of it. No parallelism lives here.

The trainer's contract: `model(tokens, segments=..., memory=None, labels=...)` returns
(summed cross-entropy in fp32, positions counted). A memory model builds its own targets from
`tokens` for its current objective; the loader's `labels` (next token, masked after EOT) and
`segments` (documents) do not describe chunk-wise or copy targets, so they are ignored: a packed
row is one stream of tokens, and only padding is never scored.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from hmtrain.config import Context, MemoryModelConfig, StageConfig
from hmtrain.model.loss import lm_loss_sum
from hmtrain.model.objectives import OBJECTIVES, ObjectivePart, count_targets, layout
from hmtrain.model.stacks import Expansion, Rope, assign_, build_blocks, init_parameter, run_blocks, score_logits
from hmtrain.model.transformer import RMSNorm

CONTEXTS = Context.values()
PARTS = ("encoder_embedding", "encoder_blocks", "encoder", "decoder", "autoencoder_decoder")


def curriculum_objectives(mm: MemoryModelConfig) -> list[str]:
    return [stage.objective for stage in mm.stages] or [mm.objective]


class MemoryModel(nn.Module):
    def __init__(self, mm: MemoryModelConfig, vocab_size: int):
        super().__init__()
        if mm.pad_id is None:
            raise ValueError("memory_model.pad_id is not set: it is the prepared data's padding id (the trainer "
                             "and the eval tools fill it in from the data's manifest)")
        if mm.context not in CONTEXTS:
            raise ValueError(f"memory_model.context must be one of {CONTEXTS}, got {mm.context!r}")
        self.cfg = mm
        self.vocab_size = vocab_size
        self.chunks, self.n_ctx, self.pad_id, self.context = mm.chunks, mm.n_ctx, mm.pad_id, mm.context
        objectives = curriculum_objectives(mm)
        self.objective = objectives[0]
        self.has_autoencoder = "autoencode" in objectives
        self.has_encoder = mm.context == "memory" or self.has_autoencoder
        s, n, enc, dec = mm.chunks, mm.n_ctx, mm.encoder, mm.decoder
        self.row_length = 1 + s * n if mm.context == "full" else s + n
        kw = {"norm_eps": mm.norm_eps, "rope_base": mm.rope_base}
        blocks: list[nn.Module] = []
        self._spans: dict[str, tuple[int, int]] = {}

        def add(stack: str, new: list[nn.Module]) -> None:
            self._spans[stack] = (len(blocks), len(blocks) + len(new))
            blocks.extend(new)

        transformer = mm.block == "transformer"
        if self.has_encoder:
            self.encoder_embedding = nn.Embedding(vocab_size, enc.d_model)
            add("encoder", build_blocks(mm.block, enc, n, **kw))
            self.encoder_norm = RMSNorm(enc.d_model, mm.norm_eps)
            self.encoder_rope = Rope(enc.head_dim, n, mm.rope_base) if transformer else None
            same = enc.d_model == dec.d_model
            self.memory_proj = nn.Identity() if same else nn.Linear(enc.d_model, dec.d_model, bias=False)
        self.memory_filler = nn.Parameter(torch.ones(dec.d_model))
        self.decoder_embedding = nn.Embedding(vocab_size, dec.d_model)
        add("decoder", build_blocks(mm.block, dec, self.row_length, **kw))
        self.decoder_norm = RMSNorm(dec.d_model, mm.norm_eps)
        self.decoder_head = nn.Linear(dec.d_model, vocab_size, bias=False)
        if mm.tie_embeddings:
            self.decoder_head.weight = self.decoder_embedding.weight
        self.decoder_rope = Rope(dec.head_dim, self.row_length, mm.rope_base) if transformer else None
        if self.has_autoencoder:
            self.ae_expansion = Expansion(mm.expansion, enc.d_model, dec.d_model, n)
            add("autoencoder", build_blocks(mm.block, dec, n, **kw))
            self.ae_norm = RMSNorm(dec.d_model, mm.norm_eps)
            self.ae_head = nn.Linear(dec.d_model, vocab_size, bias=False)
        self.layers = nn.ModuleList(blocks)
        self.reset_parameters()

    # -- parameters by part ------------------------------------------------------------------

    def _stack(self, name: str) -> nn.ModuleList:
        start, stop = self._spans.get(name, (0, 0))
        return self.layers[start:stop]

    def _prefixes(self, part: str) -> tuple[str, ...]:
        def layers(stack: str) -> tuple[str, ...]:
            start, stop = self._spans.get(stack, (0, 0))
            return tuple(f"layers.{i}." for i in range(start, stop))

        if part == "encoder_embedding":
            return ("encoder_embedding.",)
        if part == "encoder_blocks":
            return (*layers("encoder"), "encoder_norm.")
        if part == "encoder":
            return self._prefixes("encoder_embedding") + self._prefixes("encoder_blocks")
        if part == "decoder":
            return ("memory_proj.", "memory_filler", "decoder_embedding.", *layers("decoder"), "decoder_norm.",
                    "decoder_head.")
        if part == "autoencoder_decoder":
            return ("ae_expansion.", *layers("autoencoder"), "ae_norm.", "ae_head.")
        raise ValueError(f"unknown model part {part!r}; expected one of {PARTS}")

    def parameters_of(self, part: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of one part (PARTS); names as in `named_parameters`."""
        prefixes = self._prefixes(part)
        for name, param in self.named_parameters():
            if name.startswith(prefixes):
                yield name, param

    def _depth(self, name: str) -> int:
        encoder = name.startswith(self._prefixes("encoder"))
        return (self.cfg.encoder if encoder else self.cfg.decoder).n_layers

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() >= 2:
                    assign_(param, init_parameter(name, param, std=self.cfg.init_std, n_layers=self._depth(name)))

    def set_stage(self, stage: StageConfig, index: int, *, fresh: bool, seed: int = 0) -> None:
        """Enter a curriculum stage: its objective, its frozen parts (and the parts the objective does not
        use); with `fresh` (the stage begins now,
        not a resume inside it) its `reinit` parts get new values, from a generator fixed by
        (seed, index) so that a resumed run re-draws exactly what the uninterrupted one did."""
        if stage.objective not in OBJECTIVES:
            raise ValueError(f"stage {stage.name!r}: unknown objective {stage.objective!r}")
        if stage.objective == "autoencode" and not self.has_autoencoder:
            raise ValueError(f"stage {stage.name!r}: this model was built without an autoencoder decoder")
        frozen = {name for part in (*stage.freeze, *self.unused_parts(stage.objective))
                  for name, _ in self.parameters_of(part)}
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)
        if fresh and stage.reinit:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            with torch.no_grad():
                for part in stage.reinit:
                    for name, param in self.parameters_of(part):
                        assign_(param, init_parameter(name, param, std=self.cfg.init_std, n_layers=self._depth(name),
                                                      generator=generator))
        self.objective = stage.objective

    def unused_parts(self, objective: str) -> list[str]:
        """Parts `objective` never runs: frozen with the stage, so that the trainable parameters are
        exactly those that get gradients (and thus optimizer state, which a resume must find again)."""
        if objective == "autoencode":
            return ["decoder"]
        unused = ["autoencoder_decoder"] if self.has_autoencoder else []
        if self.has_encoder and self.context != "memory":
            unused.append("encoder")
        return unused

    # -- the computation -----------------------------------------------------------------------

    def encode(self, chunks: Tensor) -> Tensor:
        """[N, n] token ids -> [N, d_encoder]: the final-norm state at the last position."""
        if not self.has_encoder:
            raise ValueError(f"a memory model with context={self.context!r} has no encoder")
        x = run_blocks(self._stack("encoder"), self.encoder_embedding(chunks), self.encoder_rope)
        return self.encoder_norm(x[:, -1])

    def _memories(self, inputs: Tensor, upto: int) -> Tensor:
        """[R, upto, d_decoder]: the memories of chunks 0..upto-1 of `inputs` [R, s, n]."""
        R = inputs.shape[0]
        flat = inputs[:, :upto].reshape(R * upto, self.n_ctx)
        return self.memory_proj(self.encode(flat)).reshape(R, upto, -1)

    def _parts_memories(self, parts: list[ObjectivePart], objective: str) -> list[Optional[Tensor]]:
        """Each part's memories of chunks 0..max(scored)-1 (None where no slot holds one). Combined reuses
        the clm part's: blank copy's first half is the same chunks, its second half one padding chunk."""
        if self.context != "memory":
            return [None] * len(parts)
        if objective != "combined":
            return [self._memories(p.inputs, max(p.scored)) if max(p.scored) > 0 else None for p in parts]
        clm, blank = parts
        R, s, n = clm.inputs.shape
        h = s // 2
        shared = self._memories(clm.inputs, s - 1)
        padding = self._memories(torch.full((1, 1, n), self.pad_id, dtype=clm.inputs.dtype,
                                            device=clm.inputs.device), 1)
        return [shared, torch.cat([shared[:, :h], padding.expand(R, s - 1 - h, -1)], dim=1)]

    def _decoder_rows(self, part: ObjectivePart, memories: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(decoder input rows, their targets) of one part."""
        R, s, n = part.inputs.shape
        filler = self.memory_filler
        if self.context == "full":
            tokens = self.decoder_embedding(part.inputs.reshape(R, s * n))
            rows = torch.cat([filler.to(tokens.dtype).expand(R, 1, -1), tokens], dim=1)
            return rows, part.targets.reshape(R, s * n)
        idx = torch.tensor(part.scored, device=part.inputs.device)
        tokens = self.decoder_embedding(part.inputs[:, idx])  # [R, C, n, d]
        slots = filler.to(tokens.dtype).expand(R, len(part.scored), s, -1)  # [R, C, s, d]
        if memories is not None:  # slot j of chunk c holds memory j when j < c, else the filler
            padded = torch.cat([memories.to(tokens.dtype), slots[:, 0, memories.shape[1]:]], dim=1)  # [R, s, d]
            seen = torch.arange(s, device=idx.device)[None, :] < idx[:, None]  # [C, s]
            slots = torch.where(seen[None, :, :, None], padded[:, None], slots)
        rows = torch.cat([slots, tokens], dim=2).reshape(R * len(part.scored), s + n, -1)
        return rows, part.targets[:, idx].reshape(-1, n)

    def outputs(self, tokens: Tensor, objective: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(final hidden states [N, L, d], head weight [V, d], targets [N, L]) of `objective` (default:
        the current stage's) on `tokens` [B, chunks * n_ctx]."""
        objective = objective or self.objective
        expected = self.chunks * self.n_ctx
        if tokens.dim() != 2 or tokens.shape[1] != expected:
            raise ValueError(f"a memory model of {self.chunks} chunks x {self.n_ctx} tokens takes [B, {expected}] "
                             f"tokens, got {tuple(tokens.shape)}")
        parts = layout(tokens, objective, self.chunks, self.pad_id)
        if objective == "autoencode":
            (part,) = parts
            R, s, n = part.inputs.shape
            vectors = self.encode(part.inputs.reshape(R * s, n))
            hidden = run_blocks(self._stack("autoencoder"), self.ae_expansion(vectors), self.decoder_rope)
            return self.ae_norm(hidden), self.ae_head.weight, part.targets.reshape(R * s, n)
        memories = self._parts_memories(parts, objective)
        rows, targets = zip(*(self._decoder_rows(part, mem) for part, mem in zip(parts, memories)))
        hidden = run_blocks(self._stack("decoder"), torch.cat(rows), self.decoder_rope)
        first = 0 if self.context == "full" else self.chunks - 1  # the output that emits the first target
        width = targets[0].shape[1]
        return self.decoder_norm(hidden[:, first:first + width]), self.decoder_head.weight, torch.cat(targets)

    def forward(self, tokens: Tensor, *, segments: Optional[Tensor] = None, memory=None,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(summed cross-entropy of the current objective, positions counted); `segments`, `memory` and
        `labels` are accepted for the trainer's call and ignored (see the module docstring)."""
        hidden, weight, targets = self.outputs(tokens)
        return lm_loss_sum(hidden, weight, targets)

    def count_targets(self, tokens: Tensor) -> Tensor:
        """Positions the current objective scores on `tokens`: the trainer's loss normaliser."""
        return count_targets(tokens, self.objective, self.chunks, self.pad_id)

    @torch.no_grad()
    def score(self, tokens: Tensor, objective: str, rows_per_chunk: int = 256) -> dict[str, float]:
        """{'loss_sum', 'count', 'correct'} of `objective` on `tokens` (accuracy: argmax == target)."""
        hidden, weight, targets = self.outputs(tokens, objective)
        total = {"loss_sum": 0.0, "count": 0, "correct": 0}
        for start in range(0, hidden.shape[0], rows_per_chunk):
            part = score_logits((hidden[start:start + rows_per_chunk] @ weight.T).float(),
                                targets[start:start + rows_per_chunk])
            total = {k: total[k] + part[k] for k in total}
        return total
