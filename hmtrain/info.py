"""`hmtrain info`: the parameter budget of a config, per level, what one training rank holds and moves, what a
checkpoint stores, and what evaluation needs on the device and on the host, without allocating. Every figure is
arithmetic stated beside it; rows the trainer would refuse (a global batch that does not split) say so. Owner
placement runs on any world size: past k_1 ranks its groups hold several ranks each, and its traffic counts the
rows they fetch from each other (hmtrain/parallel/placement.py)."""
from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table

from hmtrain.config import AnchorMode, Config, ConfigError, split_global_batch
from hmtrain.eval.tokens_per_param import tokens_line, tokens_per_parameter
from hmtrain.memory import memory_layers, memory_sizes
from hmtrain.memory.kind import memory_kind
from hmtrain.memory.sizes import RankFootprint, bank_checkpoint_bytes, eval_footprint, rank_footprint, step_transients
from hmtrain.model import count_parameters, run_model_config
from hmtrain.model.sizes import activation_bytes, human, tensor_parallel_split, tensor_parallel_traffic
from hmtrain.parallel.placement import Groups, assign_groups
from hmtrain.parallel.tensor_parallel import check_tensor_parallel

GiB = 2**30
# checkpoint write bandwidth, all ranks together, when --checkpoint-gbps is not given: 1 GB/s, a modest
# shared filesystem's share for one job (a local NVMe drive writes 2-3)
CHECKPOINT_GBPS = 1.0
# NCCL's buffers are sized by NCCL from the topology; these are assumptions, not queried: NCCL_BUFFSIZE
# (NCCL's default 4 MiB) per channel and peer; ring collectives (FSDP's all-gather and reduce-scatter, the
# bank's all-reduce) on NCCL_CHANNELS channels to the two ring neighbours; gather placement's all-to-all
# adds NCCL_P2P_CHANNELS channels to every other rank.
NCCL_BUFFSIZE = 4 * 2**20
NCCL_CHANNELS = 16
NCCL_P2P_CHANNELS = 2


def model_config(cfg: Config):
    """The anchor's config with the vocabulary resolved as training will (tokenizer size, padded)."""
    model = cfg.model
    if model.vocab_size is None:
        vocab = -(-cfg.data.tokenizer_vocab // model.vocab_multiple) * model.vocab_multiple
        model = dataclasses.replace(model, vocab_size=vocab)
    return model


def size_summary(cfg: Config) -> dict:
    model = model_config(cfg)
    levels = memory_sizes(n_layers=len(memory_layers(cfg)), params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units)
    return {
        "anchor": count_parameters(model),
        # an open-weight anchor has no dense baseline of its family (train.mode=dense is model.family=lm)
        "dense_baseline": None if model.family == "hf" else count_parameters(
            run_model_config(model, "dense", cfg.train.dense_multiplier)),
        "fetched": sum(level.fetched_params for level in levels),
        "bank": sum(level.bank_params for level in levels),
        "levels": levels,
        "memory_layers": memory_layers(cfg),  # a bank row holds these decoder layers' slots only
    }


def layer_spans(layers: tuple[int, ...]) -> str:
    """Ascending layer indices as runs: (0, 1, 2, 5) -> "0-2, 5"."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def anchor_bytes_per_rank(params: int, world: int, engine: str, zero_stage: int) -> int:
    """Weights, gradients and AdamW state of the anchor on one rank, bf16 mixed precision."""
    if engine == "fsdp":  # fp32 sharded parameters, gradients and two moments
        return 16 * params // world
    sharded = {1: 12, 2: 14, 3: 16}[zero_stage]  # fp32 master + moments (+ bf16 grads, + bf16 params)
    return (16 - sharded) * params + sharded * params // world


def value_bytes(cfg: Config) -> int:
    """Bytes of an activation (and of a DeepSpeed module weight): bf16 unless the run is fp32 (auto is bf16 on GPU)."""
    return 4 if cfg.train.dtype == "fp32" else 2


def nccl_buffer_bytes(world_size: int, placement: str, group_size: int = 1) -> int:
    """NCCL's buffers on one rank under the assumptions stated at NCCL_BUFFSIZE (none on one process); the
    bank's all-to-all reaches every other rank under gather placement, the group's others under owner."""
    if world_size == 1:
        return 0
    ring = 2 * NCCL_CHANNELS * NCCL_BUFFSIZE
    return ring + all_to_all_peers(world_size, placement, group_size) * NCCL_P2P_CHANNELS * NCCL_BUFFSIZE


def all_to_all_peers(world_size: int, placement: str, group_size: int) -> int:
    return world_size - 1 if placement == "gather" else group_size - 1


def owner_groups(cfg: Config, world_size: int) -> Groups:
    """Owner placement's groups on `world_size` ranks (for the counts; tokens taken as equal per subtree)."""
    return assign_groups([1] * cfg.tree.branching[0], world_size)


def anchor_checkpoint_bytes(params: int, tied_embedding: int, engine: str, weight_bytes: int) -> int:
    """Bytes a checkpoint stores for the anchor, all ranks together. A tied embedding is stored twice (the
    state dict names it as the embedding and as the head). fsdp, through DCP: fp32 weights and two fp32
    AdamW moments. deepspeed: the module's weights (`weight_bytes`: bf16 under bf16) in DCP and again in
    DeepSpeed's model file, and its optimizer partitions of fp32 master weights and two moments."""
    if engine == "fsdp":
        return 4 * (params + tied_embedding) + 8 * params
    return 2 * weight_bytes * (params + tied_embedding) + 12 * params


def micro_batches_per_rank(cfg: Config, world_size: int) -> dict[str, int | str]:
    """Config key of each global batch the run uses -> micro-batches per rank per step, or the error the
    trainer stops with (the same `split_global_batch`)."""
    tc = cfg.train
    batches = {"train.global_batch_size": tc.global_batch_size}
    if tc.pretrain_global_batch_size is not None:
        batches["train.pretrain_global_batch_size"] = tc.pretrain_global_batch_size
    out: dict[str, int | str] = {}
    for key, batch in batches.items():
        try:
            out[key] = split_global_batch(batch, world_size, micro_batch_size=tc.micro_batch_size,
                                          name=f"config key '{key}'")[0]
        except ConfigError as error:
            out[key] = str(error)
    return out


def print_info(cfg: Config, console: Console | None = None, world_size: int = 1,
               checkpoint_gbps: float = CHECKPOINT_GBPS) -> dict:
    console = console or Console()
    if cfg.parallel.tensor_parallel > 1:  # a bad degree is one line, before any table
        check_degree(cfg, world_size)
    summary = size_summary(cfg)
    table = Table(title="hmtrain parameter budget")
    for column in ("part", "nodes", "units / layer", "active per sequence", "bank"):
        table.add_column(column, justify="right" if column != "part" else "left")
    table.add_row("anchor", "", "", f"{summary['anchor']:,} ({human(summary['anchor'])})", "")
    for level in summary["levels"]:
        table.add_row(f"memory level {level.level + 1}", f"{level.nodes:,}", str(level.units),
                      f"{level.fetched_params:,}", f"{level.bank_params:,}")
    table.add_row("memory total", "", str(sum(cfg.memory.units)),
                  f"{summary['fetched']:,} ({human(summary['fetched'])})",
                  f"{summary['bank']:,} ({human(summary['bank'])})")
    if summary["dense_baseline"] is not None:
        table.add_row(f"dense baseline (x{cfg.train.dense_multiplier:g})", "", "",
                      f"{summary['dense_baseline']:,} ({human(summary['dense_baseline'])})", "")
    console.print(table)
    layers, n_layers = summary["memory_layers"], cfg.model.n_layers
    console.print(f"memory in {len(layers)} of {n_layers} decoder layers (memory.layers={cfg.memory.layers}): "
                  f"{layer_spans(layers)}", markup=False, highlight=False)
    if summary["bank"] and cfg.train.mode != "dense" and cfg.model.family != "memory_model":
        summary["tokens"] = tokens_per_parameter(cfg)
        console.print(tokens_line(summary["tokens"]), markup=False, highlight=False)
    if cfg.parallel.tensor_parallel > 1:  # the 2-D layout's own table; the other, data parallel alone, to compare
        summary["tensor_parallel"] = print_tensor_parallel(cfg, summary, console, world_size)
    summary["per_rank"] = print_rank_memory(cfg, summary, console, world_size)
    summary["checkpoint"] = print_checkpoint(cfg, summary, console, checkpoint_gbps)
    summary["eval"] = print_eval_memory(cfg, summary, console)
    return summary


def bank_footprint(cfg: Config, world_size: int, routed: bool = True) -> RankFootprint:
    """`rank_footprint` for a config on `world_size` ranks; `routed=False`: owner placement's groups cutting
    their sequences evenly in stream order, as before the loader's routing (for before/after tables)."""
    par, tc = cfg.parallel, cfg.train
    groups = owner_groups(cfg, world_size)
    return rank_footprint(n_layers=len(memory_layers(cfg)), params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units, world_size=world_size,
                          replicate_levels=par.replicate_levels, generic=cfg.memory.generic,
                          weight_bytes=2 if cfg.memory.dtype == "bf16" else 4, micro_batch=tc.micro_batch_size,
                          global_batch=tc.global_batch_size, group_size=groups.group_size,
                          subtrees_per_group=groups.subtrees_per_group, placement=par.placement,
                          fetch_per_step=par.fetch == "step", routed=routed)


def print_rank_memory(cfg: Config, summary: dict, console: Console, world_size: int) -> dict:
    par, tc = cfg.parallel, cfg.train
    bank = bank_footprint(cfg, world_size)
    anchor = anchor_bytes_per_rank(summary["anchor"], world_size, par.engine, par.zero_stage)
    rows = {
        f"anchor ({par.engine}{'' if par.engine == 'fsdp' else f' ZeRO-{par.zero_stage}'}): "
        "weights, grads, AdamW": anchor,
        f"bank weights ({cfg.memory.dtype}, {par.replicate_levels} top level(s) replicated)": bank.weights,
        "bank fp32 master rows (bf16 banks only; replicated: own rows)": bank.masters,
        "bank optimizer (fp32 moments + step; replicated: own rows)": bank.optimizer,
        "bank step gradients (fp32, at most)": bank.step_grads,
        f"fetched rows + fp32 gradients, micro-batch of {tc.micro_batch_size}"
        f"{' and the step' if par.fetch == 'step' else ''} (at most)": bank.fetched,
    }
    alone = " (data parallel alone, without parallel.tensor_parallel)" if par.tensor_parallel > 1 else ""
    table = gib_table(f"memory per rank on {world_size} rank(s){alone}", rows)
    total = sum(rows.values())
    table.add_row("total held through the step", f"{total / GiB:.2f}")
    step = add_step_rows(table, cfg, summary, world_size, total)
    table.add_row("bank traffic per step, gather placement (expected)", f"{bank.moved_gather / GiB:.2f}")
    groups = owner_groups(cfg, world_size)
    table.add_row(f"bank traffic per step, owner placement, {groups.num_groups} group(s) of {groups.group_size} "
                  "rank(s) (expected)", f"{bank.moved_owner / GiB:.2f}")
    console.print(table)
    for value in step["micro_batches"].values():
        if isinstance(value, str):  # the trainer's own message, in full
            console.print(f"error: {value}", style="red", markup=False, highlight=False)
    return {"total": total, **rows, **step, "moved_gather": bank.moved_gather,
            "moved_owner": bank.moved_owner, "owner_groups": (groups.num_groups, groups.group_size)}


def add_step_rows(table: Table, cfg: Config, summary: dict, world_size: int, total: int) -> dict:
    """The rows after the total: what a step holds for a while, NCCL's buffers, the peak, the micro-batches."""
    par, tc = cfg.parallel, cfg.train
    step, largest = step_memory(cfg, summary, world_size)
    for name, value in step.items():
        table.add_row(name, f"{value / GiB:.2f}")
    group_size = owner_groups(cfg, world_size).group_size
    nccl = nccl_buffer_bytes(world_size, par.placement, group_size)
    others = all_to_all_peers(world_size, par.placement, group_size)
    peers = f" + {NCCL_P2P_CHANNELS} channels x {others} all-to-all peers" if others else ""
    table.add_row(f"NCCL buffers (assumed: {NCCL_BUFFSIZE // 2**20} MiB x ({NCCL_CHANNELS} channels x 2 ring peers"
                  f"{peers}))", f"{nccl / GiB:.2f}")
    # fetches run before a micro-batch's forward, activations live from its forward to its backward, gradient
    # returns after it and the concatenation after the step's last: the peak adds the largest of them
    peak = total + largest + nccl
    table.add_row("peak estimate: total + the largest copy or (configured) activations + NCCL", f"{peak / GiB:.2f}")
    micro = micro_batches_per_rank(cfg, world_size)
    for key, value in micro.items():
        shown = f"{value} x {tc.micro_batch_size} sequences" if isinstance(value, int) else "[red]error (below)[/red]"
        if isinstance(value, int) and par.placement == "owner":  # as many as the step's busiest rank needs
            shown = f"at least {shown}"
        table.add_row(f"micro-batches per rank per step ({key})", shown)
    return {**step, "nccl": nccl, "peak": peak, "micro_batches": micro}


def step_memory(cfg: Config, summary: dict, world_size: int) -> tuple[dict[str, int], int]:
    """(row name -> bytes a step holds for a while on one rank: the bank's transient copies and the activations
    of one micro-batch, without and with activation checkpointing; the largest of those the run holds)."""
    model, par, tc = model_config(cfg), cfg.parallel, cfg.train
    weight_bytes = 2 if cfg.memory.dtype == "bf16" else 4
    transients = step_transients(
        n_layers=len(memory_layers(cfg)), params_per_unit=memory_kind(cfg).params_per_unit,
        branching=cfg.tree.branching, units=cfg.memory.units, world_size=world_size,
        replicate_levels=par.replicate_levels, generic=cfg.memory.generic, weight_bytes=weight_bytes,
        micro_batch=tc.micro_batch_size, global_batch=tc.global_batch_size, placement=par.placement,
        group_size=owner_groups(cfg, world_size).group_size)
    shape = f"micro-batch of {tc.micro_batch_size} x {cfg.data.seq_len} tokens"
    rows = {f"bank fetch copies, one micro-batch, {par.placement} placement (at most)": transients.fetch,
            "bank gradient-return copies, one micro-batch (at most)": transients.grad_return,
            "replicated tables' gradient concatenation (fp32, at most)": transients.grad_concat}
    peak = max(rows.values())
    for checkpointing in (False, True):
        configured = checkpointing == par.activation_checkpointing
        name = (f"activations, {shape}, {'with' if checkpointing else 'no'} activation checkpointing"
                f"{' (configured)' if configured else ''}")
        rows[name] = activation_bytes(model, micro_batch=tc.micro_batch_size, seq_len=cfg.data.seq_len,
                                      memory_units=sum(cfg.memory.units), fetched=summary["fetched"],
                                      memory_layers=len(summary["memory_layers"]),
                                      checkpointing=checkpointing, value_bytes=value_bytes(cfg))
        if configured:  # the peak counts the activations the run holds
            peak = max(peak, rows[name])
    return rows, peak


def check_degree(cfg: Config, world_size: int):
    """The model the run trains (the anchor, or the dense baseline) after the trainer's tensor-parallel checks
    (`check_tensor_parallel`; a bad degree is its one-line ConfigError), and the trainer's refusal of what it
    does not split (a memory phase of a kind other than memory.kind=ffn), or None."""
    if cfg.model.family != "lm":  # refused first, before its model is sized
        check_tensor_parallel(cfg, world_size, cfg.model)
    model = run_model_config(model_config(cfg), cfg.train.mode, cfg.train.dense_multiplier)
    anchor_only = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, memory_steps=0))
    check_tensor_parallel(anchor_only, world_size, model)  # every degree check, the memory's units too
    try:
        check_tensor_parallel(cfg, world_size, model)
    except ConfigError as error:  # what is left is the memory's refusal
        return model, str(error)
    return model, None


def tensor_parallel_rows(cfg: Config, summary: dict, world_size: int) -> tuple[dict[str, int], dict]:
    """(row name -> bytes per rank of the 2-D layout, the counts behind them). The anchor's split parameters
    /N, its norms whole, then FSDP over the dp = W/N ranks; the bank's rows sharded over the dp ranks as
    without tensor parallelism, every row's units split N ways (weights, state, fetches and traffic /N);
    one micro-batch's activations on a rank; the tensor-parallel all-reduces of a step."""
    par, tc, n = cfg.parallel, cfg.train, cfg.parallel.tensor_parallel
    model, refusal = check_degree(cfg, world_size)
    dp = world_size // n
    split, replicated = tensor_parallel_split(model)
    anchor = anchor_bytes_per_rank(split // n + replicated, dp, par.engine, par.zero_stage)
    bank = bank_footprint(cfg, dp)
    with_bank = cfg.train.mode == "hierarchical" and summary["bank"] > 0
    rows = {f"anchor ({par.engine} over dp={dp}): weights, grads, AdamW of {human(split)} split /{n} + "
            f"{human(replicated)} norms whole": anchor}
    if with_bank:
        rows |= {"bank weights, fp32 masters, optimizer state (rows over dp, units /N)":
                 (bank.weights + bank.masters + bank.optimizer) // n,
                 "bank step gradients and fetched rows (at most, /N)": (bank.step_grads + bank.fetched) // n}
    activations = activation_bytes(model, micro_batch=tc.micro_batch_size, seq_len=cfg.data.seq_len,
                                   memory_units=sum(cfg.memory.units) if with_bank else 0,
                                   fetched=summary["fetched"] if with_bank else 0,
                                   memory_layers=len(summary["memory_layers"]),
                                   checkpointing=par.activation_checkpointing, value_bytes=value_bytes(cfg),
                                   tensor_parallel=n)
    rows[f"activations, one micro-batch, activation checkpointing {'on' if par.activation_checkpointing else 'off'}"
         ] = activations
    def traffic(memory_layers: int, frozen_from: int | None = None):
        return tensor_parallel_traffic(model, micro_batch=tc.micro_batch_size, seq_len=cfg.data.seq_len,
                                       value_bytes=value_bytes(cfg), checkpointing=par.activation_checkpointing,
                                       memory_layers=memory_layers, frozen_from=frozen_from)

    # the memory phase's FFN blocks with units all-reduce less backward (one copy of their input each)
    memory_phase = with_bank and refusal is None and cfg.train.memory_steps > 0 and cfg.memory.kind == "ffn"
    # a frozen anchor's backward stops at the lowest block with units
    frozen_from = min(summary["memory_layers"]) if memory_phase and tc.anchor == AnchorMode.frozen else None
    micro = micro_batches_per_rank(cfg, dp)["train.global_batch_size"]
    steps = micro if isinstance(micro, int) else 0
    counts = {"dp": dp, "split": split, "replicated": replicated, "traffic": traffic(0), "micro_batches": micro,
              "memory_traffic": traffic(len(summary["memory_layers"]), frozen_from) if memory_phase else None,
              "refusal": refusal, "moved": (bank.moved_gather // n, bank.moved_owner // n) if with_bank else None}
    counts["step_allreduce_bytes"] = steps * (counts["traffic"].data_bytes + counts["traffic"].small_bytes)
    if memory_phase:
        mem = counts["memory_traffic"]
        counts["memory_step_allreduce_bytes"] = steps * (mem.data_bytes + mem.small_bytes)
    return rows, counts


def gib_table(title: str, rows: dict[str, float]) -> Table:
    """A per-rank table: one row per part, in GiB."""
    table = Table(title=title)
    table.add_column("what")
    table.add_column("GiB per rank", justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value / GiB:.2f}")
    return table


def print_tensor_parallel(cfg: Config, summary: dict, console: Console, world_size: int) -> dict:
    n = cfg.parallel.tensor_parallel
    rows, counts = tensor_parallel_rows(cfg, summary, world_size)
    table = gib_table(f"memory per rank on {world_size} rank(s): tensor parallel {n} x data parallel {counts['dp']}",
                      rows)
    total = sum(rows.values())
    table.add_row("total: held through the step + one micro-batch's activations", f"{total / GiB:.2f}")
    traffic, micro, memory_traffic = counts["traffic"], counts["micro_batches"], counts["memory_traffic"]
    if isinstance(micro, int):
        phase = ", the anchor alone" if memory_traffic is not None else ""
        table.add_row(f"tensor-parallel all-reduces per step (train.global_batch_size{phase}): {micro} "
                      f"micro-batch(es) x ({traffic.count} of [B, T, d] + {traffic.small_count} per-token fp32) "
                      "(a ring sends 2 (N-1)/N of it)",
                      f"{counts['step_allreduce_bytes'] / GiB:.2f}")
        if memory_traffic is not None:
            table.add_row(f"tensor-parallel all-reduces per step, memory phase: {micro} micro-batch(es) x "
                          f"({memory_traffic.count} of [B, T, d] + {memory_traffic.small_count} per-token fp32)",
                          f"{counts['memory_step_allreduce_bytes'] / GiB:.2f}")
    if counts["moved"] is not None:
        table.add_row("bank traffic per step, gather placement (expected, /N)", f"{counts['moved'][0] / GiB:.2f}")
        table.add_row("bank traffic per step, owner placement (expected, /N)", f"{counts['moved'][1] / GiB:.2f}")
    console.print(table)
    if counts["refusal"] is not None and counts["moved"] is not None:
        console.print("note: the bank rows are this memory's units split over tensor-parallel ranks as "
                      "memory.kind=ffn's are; the trainer refuses this kind's memory phase under tensor parallelism: "
                      f"{counts['refusal']}", markup=False, highlight=False)
    if isinstance(micro, str):
        console.print(f"error: {micro}", style="red", markup=False, highlight=False)
    return {"total": total, **rows, **counts}


def print_checkpoint(cfg: Config, summary: dict, console: Console, gbps: float) -> dict:
    """A checkpoint's bytes (all ranks together) and its write time at `gbps` GB/s."""
    model, par = model_config(cfg), cfg.parallel
    tied = model.vocab_size * model.d_model if model.tie_embeddings else 0
    anchor = anchor_checkpoint_bytes(summary["anchor"], tied, par.engine, value_bytes(cfg))
    bank = bank_checkpoint_bytes(n_layers=len(memory_layers(cfg)), params_per_unit=memory_kind(cfg).params_per_unit,
                                 branching=cfg.tree.branching, units=cfg.memory.units, generic=cfg.memory.generic,
                                 weight_bytes=2 if cfg.memory.dtype == "bf16" else 4)
    total = anchor + bank
    seconds = total / (gbps * 1e9)
    table = Table(title="checkpoint, all ranks together")
    table.add_column("what")
    table.add_column("size", justify="right")
    table.add_row(f"anchor ({par.engine}): weights and AdamW state", f"{anchor / GiB:.2f} GiB")
    masters = " fp32 masters," if cfg.memory.dtype == "bf16" else ""
    table.add_row(f"bank ({cfg.memory.dtype}): rows,{masters} moments and step counts", f"{bank / GiB:.2f} GiB")
    table.add_row("total", f"{total / GiB:.2f} GiB")
    table.add_row(f"write time at {gbps:g} GB/s (--checkpoint-gbps)", f"{seconds:.1f} s")
    margin = usr1_margin_s(seconds)
    table.add_row("SLURM: sbatch --signal=B:USR1@N, N at least (the step in flight, then the save, twice over)",
                  f"{margin} s")
    table.add_row("parallel.checkpoint_timeout_s at least", f"{checkpoint_timeout_s(seconds)} s")
    console.print(table)
    floor = checkpoint_timeout_s(seconds)
    if cfg.parallel.checkpoint_timeout_s < floor:
        console.print(f"warning: parallel.checkpoint_timeout_s={cfg.parallel.checkpoint_timeout_s} is less than "
                      f"this checkpoint's write time needs ({floor} s at {gbps:g} GB/s)", style="yellow", markup=False)
    return {"anchor": anchor, "bank": bank, "total": total, "write_s": seconds, "usr1_margin_s": margin}


def usr1_margin_s(write_s: float) -> int:
    """Seconds before the time limit SLURM should signal the job: a stop is taken at the end of the step in
    flight and then saved (blocking), so twice the write time plus a minute for the step, at least 120 s."""
    return max(120, int(2 * write_s + 60 + 0.999))


def checkpoint_timeout_s(write_s: float) -> int:
    """A checkpoint collective must outlast the slowest rank's write: four times its share, at least 10 min."""
    return max(600, int(4 * write_s + 0.999))


def print_eval_memory(cfg: Config, summary: dict, console: Console) -> dict:
    """`eval` and `generate --checkpoint` on one process (hmtrain/eval/loading.py): the anchor and each batch's
    fetched rows on the device; the bank's weights, without optimizer state, in host memory."""
    weight_bytes = 2 if cfg.memory.dtype == "bf16" else 4
    batch = cfg.eval.probe_batch_size  # the largest batch eval looks up; held-out batches are eval.batch_size
    bank = eval_footprint(n_layers=len(memory_layers(cfg)), params_per_unit=memory_kind(cfg).params_per_unit,
                          branching=cfg.tree.branching, units=cfg.memory.units, generic=cfg.memory.generic,
                          weight_bytes=weight_bytes, batch=batch)
    device = {"anchor weights (fp32)": 4 * summary["anchor"],
              f"fetched rows of a probe batch of {batch} (at most)": bank.fetched}
    host = {f"bank weights ({cfg.memory.dtype}, no optimizer state)": bank.weights,
            "fetched rows staged for the copy (pinned on CUDA)": bank.fetched,
            "while loading: one saved chunk (at most the largest table)": bank.largest_table}
    device_total = sum(device.values())
    host_peak = bank.weights + max(bank.fetched, bank.largest_table)  # loading ends before the first lookup
    table = Table(title="eval / generate --checkpoint on one process, before activations")
    table.add_column("what")
    table.add_column("GiB", justify="right")
    for name, value in device.items():
        table.add_row(f"device: {name}", f"{value / GiB:.2f}")
    table.add_row("device total", f"{device_total / GiB:.2f}")
    for name, value in host.items():
        table.add_row(f"host: {name}", f"{value / GiB:.2f}")
    table.add_row("host peak", f"{host_peak / GiB:.2f}")
    console.print(table)
    return {"device": device_total, "host": host_peak, "bank_weights": bank.weights, "fetched": bank.fetched,
            "largest_table": bank.largest_table}
