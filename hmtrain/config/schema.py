"""The structured config: one dataclass per part, merged from YAML and `key=value` overrides.

Every field has a type and a default, so omegaconf rejects unknown keys and badly
typed values at start-up; `validate` adds the checks types cannot express.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    """The anchor transformer (paper's 160M preset: OpenLM, 35 layers, d 512)."""

    # null: the prepared data's tokenizer size, padded up to `vocab_multiple` rows (the paper's
    # 50,432 is GPT-NeoX's 50,277 padded); a number must cover the tokenizer
    vocab_size: Optional[int] = None
    vocab_multiple: int = 128
    d_model: int = 512
    n_layers: int = 35
    n_heads: int = 12
    head_dim: int = 32
    ffn_hidden: int = 2048
    tie_embeddings: bool = True
    qk_norm: bool = True
    rope_base: float = 100_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # memory-augmented FFN implementation: auto | torch | triton. auto is torch on every device until
    # a GPU run of the kernel benchmark shows the Triton kernels correct and faster (docs/benchmarks.md)
    ffn_impl: str = "auto"
    # attention: auto | flex | sdpa. auto is flex (compiled FlexAttention, block-sparse document mask)
    # on CUDA and sdpa (a dense [B,1,T,T] document mask) elsewhere: FlexAttention has no CPU backward
    attention: str = "auto"
    # lm: the anchor transformer above; memory_model: the encoder-decoder of the `memory_model`
    # section (Badger 2026), trained by the same trainer (the sizes above are then unused)
    family: str = "lm"


@dataclass
class MemoryConfig:
    """The hierarchical memory: FFN units per tree level (branching lives in `tree`)."""

    kind: str = "ffn"
    units: list[int] = field(default_factory=lambda: [256, 64, 16, 0])
    # the paper's control: a context-free memory of the fetched size
    generic: bool = True
    init_std: float = 0.02
    # storage of the bank rows: fp32 | bf16 (the paper); optimizer moments are always fp32
    dtype: str = "fp32"


@dataclass
class TreeConfig:
    """Hierarchical k-means over document embeddings (paper: 16-way, 4 levels)."""

    branching: list[int] = field(default_factory=lambda: [16, 16, 16, 16])
    em_steps: int = 20
    subsample: int = 6400
    balance: float = 1.5
    # training documents sampled to fit the tree (all are routed afterwards); 0 = all. Their
    # embeddings are held in memory (fit_sample x 384 floats): state a size for a large corpus
    fit_sample: int = 0
    seed: int = 0


@dataclass
class DataConfig:
    """Where documents come from and where prepared shards go."""

    documents: str = ""
    text_field: str = "text"
    id_field: Optional[str] = "id"
    # prepared data directory (tree, tokenizer, shards, manifest)
    prepared: str = "data/prepared"
    embedder: str = "minilm"
    embed_batch_size: int = 64
    tokenizer: str = "bpe"
    tokenizer_vocab: int = 4096
    # training documents sampled to train the bpe tokenizer (bounds its memory); 0 = all
    tokenizer_sample: int = 100_000
    seq_len: int = 2048
    shard_samples: int = 1024
    heldout_fraction: float = 0.05
    # probe questions (probes.jsonl from `hmtrain data synth`) scored by `hmtrain eval`
    probes: Optional[str] = None
    seed: int = 0
    # DataLoader worker processes that read and assemble batches (0 = in the training process)
    num_workers: int = 0
    # also check every prepared file's sha256 when training / eval starts (sizes are always checked)
    verify_checksums: bool = False
    # seconds a `data prepare` process waits for the others at a stage's end (under torchrun); rank 0
    # fits the tree and trains the tokenizer meanwhile, so this must cover them
    prepare_timeout_s: int = 3600


@dataclass
class OptimConfig:
    """AdamW plus a learning-rate schedule (paper memory phase: cosine 1e-4 -> 1e-5)."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    # cosine | wsd (warmup-stable-decay) | constant
    schedule: str = "cosine"
    # wsd only: fraction of the phase spent decaying
    decay_fraction: float = 0.2


@dataclass
class StackConfig:
    """One stack of blocks (an encoder or a decoder) of a memory model or a retention probe."""

    d_model: int = 128
    n_layers: int = 2
    # transformer blocks only (a masked mixer has no heads)
    n_heads: int = 4
    head_dim: int = 32
    ffn_hidden: int = 384


@dataclass
class StageConfig:
    """One stage of a memory model's curriculum: its steps, objective, frozen parts and schedule."""

    name: str = "train"
    steps: int = 100
    # autoencode | clm | copy | blank_copy | combined (= clm + blank_copy)
    objective: str = "clm"
    # parts whose parameters do not train in this stage: encoder_embedding | encoder_blocks | encoder |
    # decoder | autoencoder_decoder
    freeze: list[str] = field(default_factory=list)
    # parts re-initialised when the stage begins (e.g. a fresh encoder_embedding in front of frozen blocks)
    reinit: list[str] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1,
                                                                   warmup_steps=20))


@dataclass
class MemoryModelConfig:
    """Encoder-decoder memory models (Badger 2026): each chunk of n_ctx tokens becomes one vector."""

    # block type of every stack: transformer | mixer (masked mixer: a learned causal token-mixing matrix)
    block: str = "transformer"
    # s: chunks per sequence (data.seq_len must be chunks x n_ctx); paper: 4 x 256
    chunks: int = 4
    n_ctx: int = 64
    encoder: StackConfig = field(default_factory=StackConfig)
    decoder: StackConfig = field(default_factory=StackConfig)
    # what the decoder of chunk c sees besides its own tokens: memory (the vectors of chunks 0..c-1) |
    # none (fillers only: the same decoder without memory) | full (no chunking: every earlier token)
    context: str = "memory"
    # how the autoencoder's decoder spreads one vector over n_ctx positions: repeat | unrolled
    expansion: str = "unrolled"
    tie_embeddings: bool = False
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # the curriculum; empty means one stage of `train.pretrain_steps + train.memory_steps` steps on
    # `objective` with `train.anchor_optim`
    stages: list[StageConfig] = field(default_factory=list)
    objective: str = "clm"
    # the tokenizer's padding id, filled in from the prepared data (null until then)
    pad_id: Optional[int] = None


@dataclass
class RetentionConfig:
    """The information-retention probe (`hmtrain eval retention`): a fresh decoder on a frozen vector."""

    # tokens per window; each window becomes one vector
    n_ctx: int = 32
    # repeat | unrolled | both
    expansion: str = "both"
    # block type of the probe's decoder: transformer | mixer
    block: str = "transformer"
    decoder: StackConfig = field(default_factory=lambda: StackConfig(d_model=128, n_layers=2))
    steps: int = 300
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, weight_decay=0.0,
                                                                   warmup_steps=20))
    # windows used to train / evaluate the decoder (0 = all)
    train_windows: int = 4096
    heldout_windows: int = 512
    # anchor encoders: which layer's output (-1 = after the final norm) and which position (last | mean)
    anchor_layer: int = -1
    anchor_position: str = "last"
    seed: int = 0


@dataclass
class TrainConfig:
    """The loop: the paper's two phases, batch shape, checkpoints."""

    run_dir: str = "runs/default"
    seed: int = 0
    # hierarchical: anchor pretraining then the memory phase; dense: a baseline of dense_params
    mode: str = "hierarchical"
    # dense mode: total parameters as a multiple of the anchor's (paper: > 2x)
    dense_multiplier: float = 2.0
    # sequences per optimizer step, over all ranks (paper: 1,024 x 2,048 tokens = 2M tokens)
    global_batch_size: int = 8
    # sequences per forward pass on one rank; global / (micro x ranks) micro-batches are accumulated
    micro_batch_size: int = 8
    # anchor pretraining's global batch (paper: 1M tokens, half the memory phase's); null: the same
    pretrain_global_batch_size: Optional[int] = None
    pretrain_steps: int = 1000
    memory_steps: int = 1000
    # memory phase: frozen | cotrain
    anchor: str = "frozen"
    # probability a sequence uses the generic memory while co-training; null = 1/(k_1+1)
    generic_prob: Optional[float] = None
    clip_grad: float = 1.0
    # anchor pretraining (and the dense baseline): its schedule anneals by the end of pretraining
    anchor_optim: OptimConfig = field(default_factory=OptimConfig)
    # the memory phase has its own schedule (paper: cosine 1e-4 -> 1e-5, wd 1e-3), for the bank and,
    # when co-trained, the anchor; `cotrain_optim` overrides it for the anchor (null: the same)
    memory_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, min_lr=1e-5, weight_decay=1e-3, warmup_steps=0)
    )
    cotrain_optim: Optional[OptimConfig] = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # write checkpoints in a background thread (dcp.async_save) so steps do not wait on the disk
    async_checkpoint: bool = False
    log_every: int = 10
    # auto | cpu | cuda
    device: str = "auto"
    # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    dtype: str = "auto"
    progress: bool = True


@dataclass
class ParallelConfig:
    """How a job spreads over processes (torchrun / SLURM): anchor engine, bank placement."""

    # fsdp (FSDP2 fully_shard) | deepspeed (ZeRO, stage `zero_stage`); one process runs the plain model
    engine: str = "fsdp"
    zero_stage: int = 2
    # gather: ranks fetch the rows their batch needs from the owners (all-to-all);
    # owner: each sequence goes to the rank owning its level-1 subtree, deep levels stay local
    placement: str = "gather"
    # the first n tree levels are replicated on every rank (gradients all-reduced), the rest sharded
    replicate_levels: int = 0
    activation_checkpointing: bool = False
    compile: bool = False
    # auto: nccl on GPU, gloo on CPU
    backend: str = "auto"
    # seconds before a collective that a dead or hung rank blocks fails the job
    timeout_s: int = 120


@dataclass
class EvalConfig:
    batch_size: int = 8
    # held-out sequences used for perplexity; 0 = all
    max_sequences: int = 0
    # probe questions scored; 0 = all
    max_probes: int = 0


@dataclass
class LoggingConfig:
    mlflow: bool = True
    # null: $MLFLOW_TRACKING_URI, else a local store inside the run directory
    tracking_uri: Optional[str] = None
    experiment: str = "hmtrain"
    run_name: Optional[str] = None
    # CPU, memory, disk and GPU utilisation from the first rank of every node (MLflow system metrics)
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    memory_model: MemoryModelConfig = field(default_factory=MemoryModelConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
