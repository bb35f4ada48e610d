"""Parameter counts and activation sizes without allocating, and the dense baseline sized from a target count.

`count_parameters` is the arithmetic of `Transformer`; a test pins the two together,
so `hmtrain info` can print the paper's presets without building them.
"""
from __future__ import annotations

import dataclasses

from hmtrain.config import ModelConfig
from hmtrain.model.loss import CHUNK_TOKENS


def count_parameters(cfg: ModelConfig) -> int:
    if cfg.family == "hf":  # an open-weight model: counted from its config.json by transformers itself
        from hmtrain.model.hf_anchor import hf_parameter_count

        return hf_parameter_count(cfg.hf_path)
    inner = cfg.n_heads * cfg.head_dim
    attention = 4 * cfg.d_model * inner + (2 * inner if cfg.qk_norm else 0)
    ffn = 3 * cfg.d_model * cfg.ffn_hidden
    per_layer = attention + ffn + 2 * cfg.d_model  # two gain-only norms
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_layer + cfg.d_model  # final norm


def activation_bytes(cfg: ModelConfig, *, micro_batch: int, seq_len: int, memory_units: int, fetched: int,
                     checkpointing: bool, value_bytes: int = 2, memory_layers: int | None = None,
                     tensor_parallel: int = 1) -> int:
    """What one micro-batch holds for its backward, estimated as Megatron's activation formula (Korthikanti
    et al. 2022) is: the tensors each layer saves, per token, in the activation dtype (`value_bytes`: 2
    under bf16) except where hmtrain/model/transformer.py computes in fp32.

    Per layer and token, with d = d_model, q = heads x head_dim, F = ffn_hidden + M memory units:
    - 8 bytes per value normalised: an RMSNorm keeps its fp32 input and its fp32 output (the attention's
      and the FFN's norms over d, QK-norm's over q and q), and RoPE keeps fp32 copies of q and k;
    - in the activation dtype: the attention's projection input (d), the fused attention's q, k, v and
      output (4q: FlexAttention keeps no [T, T] scores, only a log-sum-exp per head), the output projection's
      input (q), the FFN's input (d) and its gate and up outputs, silu's output and the down input (4F).
    With activation checkpointing a layer keeps only its input (d) and backward recomputes one layer at a
    time. Only `memory_layers` of the layers (default: all) have the M memory units. Beside the layers:
    every sequence's fetched blocks (the FFNs' inputs either way), and the chunked loss's hidden-state
    gradient, fp32 head gradient and one chunk's logits (hmtrain/model/loss.py).

    On one of `tensor_parallel` = N ranks (hmtrain/parallel/tensor_parallel.py): what is split over heads, FFN
    and memory units, or the vocabulary (the head's gradient and a chunk's logits), is 1/N; the d-wide tensors
    (the norms over d, the projections' and FFN's inputs, the layer inputs, the hidden states' gradient) are
    whole on every rank (no sequence parallelism)."""
    n = tensor_parallel
    d, q, heads = cfg.d_model, cfg.n_heads * cfg.head_dim // n, cfg.n_heads // n
    with_memory = cfg.n_layers if memory_layers is None else memory_layers
    fp32 = 8 * (2 * d + (2 * q if cfg.qk_norm else 0) + q)  # norms' inputs and outputs, RoPE's copies (8 = 2 x 4)
    typed = value_bytes * (2 * d + 5 * q + 4 * cfg.ffn_hidden // n)
    tokens = micro_batch * seq_len
    plain = tokens * (fp32 + typed + 4 * heads)  # a layer without memory
    memory = tokens * value_bytes * 4 * memory_units // n  # what a memory layer adds
    if checkpointing:  # every layer's input, and the largest layer recomputed
        layers = cfg.n_layers * tokens * d * value_bytes + plain + (memory if with_memory else 0)
    else:
        layers = cfg.n_layers * plain + with_memory * memory
    blocks = micro_batch * fetched * value_bytes // n
    vocab = cfg.vocab_size // n
    head = tokens * d * value_bytes + vocab * d * 4 + min(CHUNK_TOKENS, tokens) * vocab * (4 + value_bytes)
    return layers + blocks + head


def tensor_parallel_split(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters split N ways under tensor parallelism, parameters every tensor-parallel rank holds whole):
    the attention's projections and QK-norm gains, the FFN and the vocabulary-parallel embedding and head are
    split; the gain-only norms of every block and the final norm are replicated. The two add up to
    `count_parameters`."""
    inner = cfg.n_heads * cfg.head_dim
    per_layer = 4 * cfg.d_model * inner + (2 * inner if cfg.qk_norm else 0) + 3 * cfg.d_model * cfg.ffn_hidden
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_layer, cfg.n_layers * 2 * cfg.d_model + cfg.d_model


@dataclasses.dataclass(frozen=True)
class TensorParallelTraffic:
    """The tensor-parallel group's all-reduces of one micro-batch, forward and backward (per rank)."""

    count: int  # all-reduces of a [B, T, d_model] tensor
    data_bytes: int  # their bytes (each all-reduces this much; a ring sends and receives 2 (N-1)/N of it)
    small_count: int  # all-reduces of a value per token (QK-norm's sums of squares, the loss's statistics)
    small_bytes: int


def tensor_parallel_traffic(cfg: ModelConfig, *, micro_batch: int, seq_len: int, value_bytes: int,
                            checkpointing: bool, chunk_tokens: int = CHUNK_TOKENS,
                            memory_layers: int = 0, frozen_from: int | None = None) -> TensorParallelTraffic:
    """What hmtrain/parallel/tensor_parallel.py's split all-reduces per micro-batch (counted by tests under
    CommDebugMode): per block 2 forward (after wo and w_down) and 3 backward (the
    input gradient of wq, wk and wv together, as Megatron's fused qkv, then w_gate's and w_up's each on its own,
    as torch's styles issue them; Megatron fuses those two too), except in the `memory_layers` blocks whose FFN
    reads memory units (memory.kind=ffn's memory phase): `TensorParallelFFN` hands its slice one copy of the
    input, so 2 backward there (qkv's, then gate's and up's together); and with activation checkpointing the one
    after wo again in the recompute (torch's non-reentrant checkpoint stops recomputing at the last tensor
    backward needs, before w_down's); the embedding's output forward and the hidden states' gradient at the
    head, once each; all in the compute dtype (`value_bytes`). Small ones, fp32: QK-norm's sum of squares for q
    and k per block, forward, backward and recomputed; the loss's row maximum and [sum of exponentials, target
    logit] per chunk.

    `frozen_from`: with a frozen anchor (train.anchor=frozen), the lowest block whose FFN reads units. Nothing
    below it needs a gradient, so backward stops there: the blocks below it run no backward and no recompute
    (3 + 1 with checkpointing fewer each, and their QK-norm's 2 + 2 small ones), and it computes its units'
    gradients but no input gradient (its qkv's and its FFN's, 2 fewer, and its QK-norm's 2 backward)."""
    tokens = micro_batch * seq_len
    if not 0 <= memory_layers <= cfg.n_layers:
        raise ValueError(f"memory_layers={memory_layers}: expected 0 .. n_layers={cfg.n_layers}")
    if frozen_from is not None and not (memory_layers and 0 <= frozen_from < cfg.n_layers):
        raise ValueError(f"frozen_from={frozen_from}: expected a block 0 .. {cfg.n_layers - 1} reading units")
    per_block = 2 + 3 + (1 if checkpointing else 0)
    count = cfg.n_layers * per_block - memory_layers + 2
    qk = cfg.n_layers * 2 * (3 if checkpointing else 2) if cfg.qk_norm else 0
    if frozen_from is not None:
        count -= frozen_from * (per_block - 2) + 2
        qk -= (frozen_from * 2 * (2 if checkpointing else 1) + 2) if cfg.qk_norm else 0
    chunks = -(-tokens // chunk_tokens)
    small_bytes = qk * tokens * 4 + tokens * (4 + 8)  # the loss's: a max, then two sums, per token
    return TensorParallelTraffic(count=count, data_bytes=count * tokens * cfg.d_model * value_bytes,
                                 small_count=qk + 2 * chunks, small_bytes=small_bytes)


def human(n: int) -> str:
    """A parameter count for people: 163.51M, 4.62B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def dense_config(anchor: ModelConfig, target_params: int) -> ModelConfig:
    """A wider model of the anchor's depth whose parameter count is closest to `target_params`.

    Width (d_model, heads, FFN) scales together by one factor, so the baseline keeps the
    anchor's shape ratios; the paper's comparison is against dense models of > 2x the anchor.
    """
    if target_params < count_parameters(anchor):
        raise ValueError(f"dense target {target_params:,} is below the anchor's "
                         f"{count_parameters(anchor):,} parameters")
    best, best_gap = anchor, abs(count_parameters(anchor) - target_params)
    scale = 1.0
    while scale <= 8.0:
        candidate = dataclasses.replace(
            anchor,
            d_model=_round_to(anchor.d_model * scale, 8),
            n_heads=max(1, int(round(anchor.n_heads * scale))),
            ffn_hidden=_round_to(anchor.ffn_hidden * scale, 8),
        )
        gap = abs(count_parameters(candidate) - target_params)
        if gap < best_gap:
            best, best_gap = candidate, gap
        scale += 0.01
    return best


def run_model_config(anchor: ModelConfig, mode: str, dense_multiplier: float) -> ModelConfig:
    """The model a run trains: the anchor itself, or (mode=dense) the baseline sized from it."""
    if mode == "dense":
        return dense_config(anchor, int(dense_multiplier * count_parameters(anchor)))
    return anchor
