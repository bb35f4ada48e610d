"""Load a config: schema defaults <- YAML preset <- `key=value` overrides, then validate.

A preset is a path to a YAML file or the name of one in the repository's `configs/`.
Errors name the offending key so a typo in a 64-node launch fails before any work.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hmtrain.config.schema import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is wrong."""


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a preset (presets: {', '.join(presets)})")


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge schema defaults, a YAML preset and dotted `key=value` overrides into a Config."""
    merged = OmegaConf.structured(Config)
    try:
        if preset is not None:
            path = resolve_preset(str(preset))
            try:
                loaded = OmegaConf.load(path)
            except Exception as exc:  # yaml errors carry the line number
                raise ConfigError(f"config {path}: not valid YAML: {exc}") from exc
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. train.batch_size=8")
            key = item.split("=", 1)[0]
            if OmegaConf.select(merged, key, default=_MISSING) is _MISSING:
                raise ConfigError(f"override {item!r}: unknown key {key!r}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from exc
    config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(config)
    return config


_MISSING = object()


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first_line = str(exc).splitlines()[0]
    return f"config key {key!r}: {first_line}" if key else f"config: {first_line}"


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(config: Config) -> dict[str, Any]:
    """Dotted keys -> values, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = node

    walk("", asdict(config))
    return out


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {message}")


def validate(config: Config) -> None:
    """Checks that types alone cannot express."""
    m, mem, tree, data, train = config.model, config.memory, config.tree, config.data, config.train
    for key, value in [
        ("model.vocab_multiple", m.vocab_multiple), ("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads), ("model.head_dim", m.head_dim), ("model.ffn_hidden", m.ffn_hidden),
        ("data.seq_len", data.seq_len), ("data.shard_samples", data.shard_samples),
        ("train.global_batch_size", train.global_batch_size), ("train.micro_batch_size", train.micro_batch_size),
        ("parallel.timeout_s", config.parallel.timeout_s),
        ("train.checkpoint_every", train.checkpoint_every), ("train.log_every", train.log_every),
        ("eval.batch_size", config.eval.batch_size),
    ]:
        _require(value > 0, key, f"must be positive, got {value}")
    if m.vocab_size is not None:
        _require(m.vocab_size > 0, "model.vocab_size", f"must be positive (or null: the tokenizer's), got {m.vocab_size}")
    _require(train.global_batch_size % train.micro_batch_size == 0, "train.global_batch_size",
             f"{train.global_batch_size} is not a multiple of train.micro_batch_size={train.micro_batch_size}")
    if train.pretrain_global_batch_size is not None:
        _require(train.pretrain_global_batch_size > 0 and
                 train.pretrain_global_batch_size % train.micro_batch_size == 0, "train.pretrain_global_batch_size",
                 f"must be a positive multiple of train.micro_batch_size={train.micro_batch_size}, "
                 f"got {train.pretrain_global_batch_size}")
    _require(mem.dtype in ("fp32", "bf16"), "memory.dtype", f"must be fp32 or bf16, got {mem.dtype!r}")
    par = config.parallel
    _require(par.engine in ("fsdp", "deepspeed"), "parallel.engine", f"must be fsdp or deepspeed, got {par.engine!r}")
    _require(par.zero_stage in (1, 2, 3), "parallel.zero_stage", f"must be 1, 2 or 3, got {par.zero_stage}")
    _require(par.placement in ("gather", "owner"), "parallel.placement",
             f"must be gather or owner, got {par.placement!r}")
    _require(0 <= par.replicate_levels <= len(tree.branching), "parallel.replicate_levels",
             f"must be in [0, {len(tree.branching)}] (tree levels), got {par.replicate_levels}")
    _require(par.backend in ("auto", "nccl", "gloo"), "parallel.backend",
             f"must be auto, nccl or gloo, got {par.backend!r}")
    _require(m.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {m.head_dim}")
    _require(m.ffn_impl in ("auto", "torch", "triton"), "model.ffn_impl",
             f"must be auto, torch or triton, got {m.ffn_impl!r}")
    _require(m.attention in ("auto", "flex", "sdpa"), "model.attention",
             f"must be auto, flex or sdpa, got {m.attention!r}")
    _require(mem.kind == "ffn", "memory.kind", f"only 'ffn' memories are implemented, got {mem.kind!r}")
    _require(len(tree.branching) > 0, "tree.branching", "needs at least one level")
    _require(all(k >= 2 for k in tree.branching), "tree.branching", f"every factor must be >= 2, got {tree.branching}")
    _require(len(mem.units) == len(tree.branching), "memory.units",
             f"needs one entry per tree level ({len(tree.branching)}), got {mem.units}")
    _require(all(u >= 0 for u in mem.units), "memory.units", f"must be >= 0, got {mem.units}")
    _require(tree.balance > 1.0, "tree.balance", f"must be > 1, got {tree.balance}")
    _require(tree.em_steps >= 0, "tree.em_steps", f"must be >= 0, got {tree.em_steps}")
    _require(tree.subsample > 0, "tree.subsample", f"must be positive, got {tree.subsample}")
    _require(tree.fit_sample >= 0, "tree.fit_sample", f"must be >= 0 (0 = all documents), got {tree.fit_sample}")
    _require(data.embed_batch_size > 0, "data.embed_batch_size", f"must be positive, got {data.embed_batch_size}")
    _require(data.tokenizer_sample >= 0, "data.tokenizer_sample",
             f"must be >= 0 (0 = all training documents), got {data.tokenizer_sample}")
    _require(data.prepare_timeout_s > 0, "data.prepare_timeout_s", f"must be positive, got {data.prepare_timeout_s}")
    _require(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    _require(bool(data.text_field), "data.text_field", "must name the documents' text field")
    _require(bool(data.prepared), "data.prepared", "must name the prepared data directory")
    _require(data.tokenizer != "bpe" or data.tokenizer_vocab >= 258, "data.tokenizer_vocab",
             f"a bpe tokenizer needs >= 258 (256 bytes + 2 special tokens), got {data.tokenizer_vocab}")
    _require(0.0 <= data.heldout_fraction < 1.0, "data.heldout_fraction",
             f"must be in [0, 1), got {data.heldout_fraction}")
    _require(data.tokenizer in ("bpe", "byte"), "data.tokenizer", f"must be bpe or byte, got {data.tokenizer!r}")
    _require(train.mode in ("hierarchical", "dense"), "train.mode",
             f"must be hierarchical or dense, got {train.mode!r}")
    _require(train.anchor in ("frozen", "cotrain"), "train.anchor", f"must be frozen or cotrain, got {train.anchor!r}")
    _require(train.pretrain_steps >= 0 and train.memory_steps >= 0, "train.pretrain_steps",
             "phase lengths must be >= 0")
    _require(train.pretrain_steps + train.memory_steps > 0, "train.memory_steps", "nothing to train: both phases are 0")
    _require(train.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {train.device!r}")
    _require(train.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"must be auto, fp32 or bf16, got {train.dtype!r}")
    _require(train.dense_multiplier > 0, "train.dense_multiplier", "must be positive")
    if train.generic_prob is not None:
        _require(0.0 <= train.generic_prob <= 1.0, "train.generic_prob", f"must be in [0, 1], got {train.generic_prob}")
    optims = [("train.anchor_optim", train.anchor_optim), ("train.memory_optim", train.memory_optim)]
    if train.cotrain_optim is not None:
        optims.append(("train.cotrain_optim", train.cotrain_optim))
    _require(m.family in ("lm", "memory_model"), "model.family", f"must be lm or memory_model, got {m.family!r}")
    if m.family == "memory_model":
        optims += [(f"memory_model.stages[{i}].optim", stage.optim) for i, stage in enumerate(config.memory_model.stages)]
        _validate_memory_model(config)
    _validate_retention(config)
    for name, optim in optims:
        _require(optim.schedule in ("cosine", "wsd", "constant"), f"{name}.schedule",
                 f"must be cosine, wsd or constant, got {optim.schedule!r}")
        _require(optim.lr > 0 and 0 <= optim.min_lr <= optim.lr, f"{name}.lr", "need 0 <= min_lr <= lr and lr > 0")
        _require(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas), f"{name}.betas",
                 f"need two values in [0, 1), got {optim.betas}")
        _require(optim.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
        _require(0 < optim.decay_fraction <= 1, f"{name}.decay_fraction", "must be in (0, 1]")


OBJECTIVES = ("autoencode", "clm", "copy", "blank_copy", "combined")
MODEL_PARTS = ("encoder_embedding", "encoder_blocks", "encoder", "decoder", "autoencoder_decoder")


def _validate_stack(key: str, stack, block: str) -> None:
    for name in ("d_model", "n_layers", "ffn_hidden"):
        value = getattr(stack, name)
        _require(value > 0, f"{key}.{name}", f"must be positive, got {value}")
    if block == "transformer":
        _require(stack.n_heads > 0 and stack.head_dim > 0 and stack.head_dim % 2 == 0, f"{key}.head_dim",
                 f"transformer blocks need n_heads > 0 and an even head_dim > 0, got {stack.n_heads} x {stack.head_dim}")


def _validate_memory_model(config: Config) -> None:
    """model.family=memory_model: the `memory_model` section, its curriculum, and what it needs elsewhere."""
    mm, data = config.memory_model, config.data
    _require(mm.block in ("transformer", "mixer"), "memory_model.block",
             f"must be transformer or mixer, got {mm.block!r}")
    _require(mm.context in ("memory", "none", "full"), "memory_model.context",
             f"must be memory, none or full, got {mm.context!r}")
    _require(mm.expansion in ("repeat", "unrolled"), "memory_model.expansion",
             f"must be repeat or unrolled, got {mm.expansion!r}")
    _require(mm.chunks > 0 and mm.n_ctx > 0, "memory_model.chunks", f"chunks and n_ctx must be positive, got "
             f"{mm.chunks} x {mm.n_ctx}")
    _require(data.seq_len == mm.chunks * mm.n_ctx, "data.seq_len",
             f"a memory model reads sequences of memory_model.chunks x n_ctx = {mm.chunks} x {mm.n_ctx} = "
             f"{mm.chunks * mm.n_ctx} tokens, got {data.seq_len}")
    _validate_stack("memory_model.encoder", mm.encoder, mm.block)
    _validate_stack("memory_model.decoder", mm.decoder, mm.block)
    _require(config.parallel.engine == "fsdp", "parallel.engine",
             "memory models train with the fsdp engine (a plain module on one process); deepspeed is not supported")
    stages = [("memory_model.objective", mm.objective, [], [], 1)] if not mm.stages else [
        (f"memory_model.stages[{i}]", s.objective, s.freeze, s.reinit, s.steps) for i, s in enumerate(mm.stages)]
    for key, objective, freeze, reinit, steps in stages:
        _require(objective in OBJECTIVES, key if key.endswith("objective") else f"{key}.objective",
                 f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        _require(steps > 0, f"{key}.steps", f"must be positive, got {steps}")
        for name, parts in (("freeze", freeze), ("reinit", reinit)):
            bad = [p for p in parts if p not in MODEL_PARTS]
            _require(not bad, f"{key}.{name}", f"unknown parts {bad}; parts are {', '.join(MODEL_PARTS)}")
        if objective in ("copy", "blank_copy", "combined"):
            _require(mm.chunks >= 2 and mm.chunks % 2 == 0, "memory_model.chunks",
                     f"the {objective} objective copies the first half of the chunks into the second: needs an even "
                     f"number >= 2, got {mm.chunks}")
        if objective == "autoencode" or any(p.startswith("encoder") for p in (*freeze, *reinit)):
            _require(mm.context == "memory" or objective == "autoencode", "memory_model.context",
                     f"{key} uses the encoder, which a memory model with context={mm.context!r} does not have")
        if objective == "autoencode" and mm.expansion == "unrolled":
            _require(mm.encoder.d_model % 2 == 0, "memory_model.encoder.d_model",
                     f"the unrolled expansion needs an even encoder width, got {mm.encoder.d_model}")
    if not mm.stages:
        _require(config.train.pretrain_steps + config.train.memory_steps > 0, "train.pretrain_steps",
                 "a memory model without stages trains for train.pretrain_steps + train.memory_steps steps")


def _validate_retention(config: Config) -> None:
    r = config.retention
    _require(r.n_ctx > 0, "retention.n_ctx", f"must be positive, got {r.n_ctx}")
    _require(r.expansion in ("repeat", "unrolled", "both"), "retention.expansion",
             f"must be repeat, unrolled or both, got {r.expansion!r}")
    _require(r.block in ("transformer", "mixer"), "retention.block", f"must be transformer or mixer, got {r.block!r}")
    _validate_stack("retention.decoder", r.decoder, r.block)
    for key, value in (("retention.steps", r.steps), ("retention.batch_size", r.batch_size)):
        _require(value > 0, key, f"must be positive, got {value}")
    for key, value in (("retention.train_windows", r.train_windows), ("retention.heldout_windows", r.heldout_windows)):
        _require(value >= 0, key, f"must be >= 0 (0 = all), got {value}")
    _require(r.anchor_position in ("last", "mean"), "retention.anchor_position",
             f"must be last or mean, got {r.anchor_position!r}")
