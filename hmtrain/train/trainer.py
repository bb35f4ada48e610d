"""`hmtrain train`: the training loop, top to bottom, on one process or many (torchrun / SLURM).

One config runs the paper's two phases (hmtrain/train/recipe.py): anchor pretraining, then the
memory phase, where every sequence fetches the blocks on its path from the row-sharded bank and
the anchor is frozen or co-trained. `train.mode=dense` trains the dense baseline instead.

A step: the loader hands this rank its micro-batches of one global batch; the bank plans the
step's fetches (one exchange of row ids); each micro-batch fetches its rows, runs forward and
backward with the loss normalised by the global token count, and returns its row gradients to
their owners; one global norm over anchor and bank clips both; the anchor engine and the bank's
sparse AdamW step. Parallelism, checkpointing and logging are applied by the functions this file
calls, not woven through it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from hmtrain.config import Config, flatten, split_global_batch, to_yaml
from hmtrain.data.loader import StepLoader
from hmtrain.data.prepared import PreparedData
from hmtrain.memory import Comm, MemoryBank, build_bank, uses_memory
from hmtrain.memory.bank_state import bank_state_for_load, bank_state_for_save, restore_bank
from hmtrain.model import Transformer, build_model, count_parameters, counted_targets, run_model_config
from hmtrain.parallel import resolve_precision
from hmtrain.parallel.anchor import TorchAnchor
from hmtrain.parallel.dist import DistInfo, init_distributed, new_group
from hmtrain.parallel.parallelize import parallelize
from hmtrain.parallel.placement import assign_subtrees
from hmtrain.train.checkpoint import CheckpointError, Checkpointer
from hmtrain.train.metrics import JsonlLogger, MLflowLogger, MultiLogger, default_tracking_uri
from hmtrain.train.recipe import MEMORY, Recipe
from hmtrain.train.resume import load_for_resume, started_before_first_checkpoint
from hmtrain.train.rundir import lock_run_dir
from hmtrain.train.signals import Interrupted, StopRequest
from hmtrain.train.system_metrics import start_system_metrics, stop_system_metrics
from hmtrain.train.throughput import peak_flops, reduce_over_ranks, train_flops_per_token

log = logging.getLogger(__name__)


def resolve_vocab(cfg: Config, data: PreparedData) -> Config:
    """Tie the model's vocabulary to the tokenizer the data was prepared with (padded, as the paper's)."""
    tokenizer_vocab = int(data.manifest["vocab_size"])
    if cfg.model.vocab_size is None:
        multiple = cfg.model.vocab_multiple
        cfg.model.vocab_size = -(-tokenizer_vocab // multiple) * multiple
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ValueError(f"config key 'model.vocab_size' is {cfg.model.vocab_size}, smaller than the tokenizer's "
                         f"{tokenizer_vocab} in {data.root}")
    if cfg.model.family == "memory_model":  # a memory model never scores padding, and blank copy writes it
        cfg.memory_model.pad_id = int(data.manifest["pad_id"])
    return cfg


def micro_batches_per_step(global_batch: int, micro: int, world: int) -> int:
    return split_global_batch(global_batch, world, micro_batch_size=micro)[0]


def build_anchor(model: Transformer, cfg: Config, info: DistInfo, recipe: Recipe, step: int, precision):
    """The anchor's engine: FSDP2 (or a plain module on one process), or DeepSpeed ZeRO."""
    optim = recipe.anchor_optim(recipe.phase(step))
    if info.distributed and cfg.parallel.engine == "deepspeed":
        from hmtrain.parallel.deepspeed_engine import DeepSpeedAnchor

        batch = recipe.at(step).global_batch
        return DeepSpeedAnchor(model, optim, info.device, zero_stage=cfg.parallel.zero_stage,
                               micro_batch=cfg.train.micro_batch_size,
                               accumulation=micro_batches_per_step(batch, cfg.train.micro_batch_size, info.world_size),
                               world_size=info.world_size, bf16=precision.autocast_dtype == torch.bfloat16)
    return TorchAnchor(model, optim, info.device)


def train(cfg: Config, *, resume: bool = False, fallback: bool = False) -> Path:
    """Run (or resume) training; returns the final checkpoint directory. `fallback`: resume from
    the newest loadable checkpoint when the latest is broken."""
    info = init_distributed(cfg.parallel, cfg.train)
    # read-only checks first, so a bad input leaves no trace in the run directory
    data = PreparedData.open(cfg.data.prepared, verify="checksums" if cfg.data.verify_checksums else "sizes")
    data.check_compatible(cfg)
    with lock_run_dir(Path(cfg.train.run_dir), rank=info.rank):  # one live `train` per run directory
        return _train(cfg, info, data, resume, fallback)


def _train(cfg: Config, info: DistInfo, data: PreparedData, resume: bool, fallback: bool) -> Path:
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    precision = resolve_precision(tc, info.device)
    device = info.device
    cfg = resolve_vocab(cfg, data)
    # host-side integers go over gloo when the main group is NCCL; checkpoints write on their own gloo group
    side = new_group("gloo", cfg.parallel.timeout_s) if info.distributed else None
    comm = Comm(device=info.collective_device, control_group=side if info.backend == "nccl" else None)

    torch.manual_seed(tc.seed)  # the same initial anchor on every rank, sharded afterwards
    model_cfg = run_model_config(cfg.model, tc.mode, tc.dense_multiplier)
    model = build_model(cfg, model_cfg).to(device)
    model = parallelize(model, cfg.parallel, info, precision.autocast_dtype)
    recipe = Recipe(cfg, has_memory=uses_memory(cfg))
    owner_of_subtree = None
    if cfg.parallel.placement == "owner" and info.world_size > 1:
        owner_of_subtree = assign_subtrees(data.manifest["node_tokens"][0], info.world_size)
    bank: Optional[MemoryBank] = None
    if recipe.has_memory:
        bank = build_bank(cfg, device, comm=comm, owner_of_subtree=owner_of_subtree)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints, process_group=side)

    step, run_id = 0, None
    latest = checkpointer.latest()
    if not resume and latest is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints (latest {latest.name}); pass --resume to "
                              "continue it, or set train.run_dir to a new directory")
    if resume and started_before_first_checkpoint(checkpointer, run_dir):
        resume = False  # killed before its first checkpoint: run it again from step 0
    anchor = None

    def loader_for(global_batch: int, state: Optional[dict] = None) -> StepLoader:
        micro = micro_batches_per_step(global_batch, tc.micro_batch_size, info.world_size)
        loader = StepLoader(data, "train", global_batch=global_batch, micro_batches=micro, seed=tc.seed,
                            rank=info.rank, world_size=info.world_size, owner_of_subtree=owner_of_subtree,
                            num_workers=cfg.data.num_workers)
        if state is not None:
            loader.load_state_dict(state)
        return loader

    def state_to_load(record: dict) -> dict:
        nonlocal anchor  # the anchor's optimizer takes the shape of the checkpoint step's phase
        recipe.apply_stage(model, max(int(record["step"]) - 1, 0), fresh=False)  # its saved optimizer's params
        anchor = build_anchor(model, cfg, info, recipe, int(record["step"]), precision)
        return {**anchor.state_dict(), **({"bank": bank_state_for_load(bank)} if bank else {})}

    loader_state, stage_begins = None, False
    if resume:
        latest, loaded, record = load_for_resume(checkpointer, cfg, data.fingerprints(), data.root, state_to_load,
                                                 fallback=fallback)
        step = int(record["step"])
        # the optimizer state carries over only within a phase (a new phase starts with fresh moments)
        same_phase = record.get("optimizer_phase") == recipe.phase(step)
        anchor.load_state_dict(loaded, with_optimizer=same_phase)
        stage_begins = not same_phase  # checkpointed at a phase switch: the new stage starts with this step
        if same_phase:
            anchor.load_extra(latest)
        else:  # building the load template stepped the optimizer once (zero moments, step 1): start it afresh
            anchor.reset(recipe.anchor_optim(recipe.phase(step)),
                         accumulation=micro_batches_per_step(recipe.at(step).global_batch, tc.micro_batch_size,
                                                             info.world_size))
        if bank is not None:
            restore_bank(bank, loaded["bank"])
        loader_state, run_id = record["loader"], record.get("mlflow_run_id")
        log.info("resumed from %s at step %d", latest, step)
    else:
        anchor = build_anchor(model, cfg, info, recipe, step, precision)

    tracker, jsonl = None, None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # before config.yaml is rewritten: a broken metrics.jsonl stops a resume with nothing changed
        jsonl = JsonlLogger(run_dir / "metrics.jsonl", resume_step=step if resume else None)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if cfg.logging.mlflow:
            n_params = count_parameters(model_cfg) if cfg.model.family == "lm" else sum(
                p.numel() for p in model.parameters())
            params = {**flatten(cfg), "model.parameters": n_params,
                      "memory.bank_parameters": bank.num_parameters() if bank else 0,
                      "memory.fetched_parameters": bank.fetched_parameters() if bank else 0,
                      "parallel.world_size": info.world_size}
            tracker = MLflowLogger(tracking_uri=cfg.logging.tracking_uri or default_tracking_uri(run_dir),
                                   experiment=cfg.logging.experiment, run_name=cfg.logging.run_name or run_dir.name,
                                   run_id=run_id, artifact_dir=run_dir / "mlartifacts", run_dir=run_dir,
                                   resume=resume, params=params)
            if resume:
                tracker.backfill(jsonl.records)  # durable steps an earlier process could not send
            if tracker.is_new:
                for artifact in (run_dir / "config.yaml", data.root / data.manifest["tree"],
                                 data.root / "manifest.json"):
                    tracker.log_artifact(artifact)
            run_id = tracker.run_id
    metrics = MultiLogger(*(x for x in (jsonl, tracker) if x is not None))
    monitor = None
    if cfg.logging.mlflow and cfg.logging.system_metrics:
        # every node's first rank logs its machine's metrics into rank 0's run
        shared = [run_id, tracker.tracking_uri if tracker is not None else None]
        if side is not None:
            torch.distributed.broadcast_object_list(shared, src=0, group=side)
        monitor = start_system_metrics(shared[0], shared[1], cfg.logging.system_metrics_interval_s, resume)

    flops_per_token = train_flops_per_token(model_cfg, cfg.data.seq_len, bank.fetched_parameters() if bank else 0)
    peak = peak_flops(device)
    stop = StopRequest()
    current = recipe.at(step)
    loader = loader_for(current.global_batch, loader_state)
    batches = iter(loader)
    anchor.set_trainable(current.anchor_trains)
    recipe.apply_stage(model, step, fresh=stage_begins)  # a memory model's curriculum stage (no-op for an LM)
    last_checkpoint: Optional[Path] = latest if resume else None
    bar = tqdm(total=recipe.total_steps, initial=step, desc=f"train ({tc.mode})",
               disable=not (tc.progress and info.is_main), dynamic_ncols=True)
    window = {"started": time.perf_counter(), "tokens": 0.0, "fetch_s": 0.0, "steps": 0}
    pad_id = int(data.manifest["pad_id"])
    status = "FAILED"

    def durable(at_step: int, path: Path) -> None:
        if tracker is not None:
            tracker.flush(at_step)  # MLflow gets a step once a complete checkpoint covers it

    def save(at_step: int, optimizer_phase: str, blocking: bool = False) -> Path:
        state = {**anchor.state_dict(), **({"bank": bank_state_for_save(bank)} if bank else {})}
        return checkpointer.save(at_step, state, {"loader": loader.state_dict(), "mlflow_run_id": run_id,
                                                  "mode": tc.mode, "optimizer_phase": optimizer_phase,
                                                  "world_size": info.world_size,
                                                  "data_fingerprints": data.fingerprints()},
                                 to_yaml(cfg), write_extra=anchor.save_extra,
                                 async_save=tc.async_checkpoint and not blocking, on_durable=durable)

    try:
        while step < recipe.total_steps:
            now = recipe.at(step)
            if now.phase != current.phase:  # the phase switch: fresh anchor moments, maybe a new batch size
                anchor.reset(recipe.anchor_optim(now.phase),
                             accumulation=micro_batches_per_step(now.global_batch, tc.micro_batch_size, info.world_size))
                anchor.set_trainable(now.anchor_trains)
                recipe.apply_stage(model, step, fresh=True)
                if now.global_batch != current.global_batch:
                    loader = loader_for(now.global_batch, loader.state_dict())
                    batches = iter(loader)
            current = now
            micro_batches, _ = next(batches)
            labels_local = sum(counted_targets(model, mb) for mb in micro_batches)
            global_tokens = comm.all_reduce_ints(np.array([labels_local]))[0]
            memory_phase = now.phase == MEMORY
            plan, generic_used = None, 0
            if memory_phase:
                generic = [recipe.generic_mask(step, mb["index"].numpy()) for mb in micro_batches]
                generic_used = int(sum(g.sum() for g in generic))
                plan = bank.plan_step([(mb["paths"], g) for mb, g in zip(micro_batches, generic)])
            loss_sum = torch.zeros((), device=device)
            for k, mb in enumerate(micro_batches):
                if len(mb["tokens"]) == 0:  # owner placement can leave a rank without sequences: run a
                    mb = _padding_batch(mb, pad_id)  # sequence of padding so FSDP's collectives stay in step
                mb = {key: value.to(device, non_blocking=True) for key, value in mb.items()}
                memory = None
                if plan is not None and plan.batch_sizes[k] > 0:
                    fetch_started = time.perf_counter()
                    memory = bank.fetch(plan, k)
                    window["fetch_s"] += time.perf_counter() - fetch_started
                with precision.autocast():
                    micro_loss, _ = anchor.model(mb["tokens"], segments=mb["segments"], memory=memory,
                                                 labels=mb["labels"])
                normaliser = anchor.loss_multiplier / max(global_tokens, 1)  # the engine may average over ranks
                anchor.backward(micro_loss * normaliser, last=k == len(micro_batches) - 1)
                if memory is not None:
                    bank.return_grads(memory, scale=1.0 / anchor.loss_multiplier)
                loss_sum += micro_loss.detach()

            anchor_sq = anchor.grad_sq_norm() if now.anchor_trains else torch.zeros((), device=device)
            bank_sq = bank.finish_grads() if memory_phase else torch.zeros((), device=device)
            grad_norm = torch.sqrt(anchor_sq + bank_sq)  # one global norm, as if anchor and bank were one model
            if now.anchor_trains:
                anchor.step(now.anchor_lr, grad_norm, tc.clip_grad)
            else:
                anchor.zero_grad()
            if memory_phase:
                scale = torch.clamp(tc.clip_grad / (grad_norm + 1e-6), max=1.0) if tc.clip_grad > 0 else 1.0
                bank.step(now.memory_lr, scale)
            step += 1
            window["tokens"] += global_tokens
            window["steps"] += 1

            if step % tc.log_every == 0 or step == recipe.total_steps:
                record = _log_record(comm, now, loss_sum, global_tokens, labels_local, grad_norm, plan,
                                     generic_used, window, flops_per_token, peak)
                metrics.log(record, step)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", phase=now.phase)
                window = {"started": time.perf_counter(), "tokens": 0.0, "fetch_s": 0.0, "steps": 0}
            bar.update(1)
            checkpointer.poll()  # complete a background save whose write has finished
            signum = stop.agreed(comm)
            if step % tc.checkpoint_every == 0 or step == recipe.total_steps or signum:
                last_checkpoint = save(step, now.phase, blocking=bool(signum) or step == recipe.total_steps)
            if signum:
                stop.signum = signum
                status = "KILLED"
                break
        else:
            status = "FINISHED"
    finally:
        bar.close()
        stop.restore()
        try:
            checkpointer.wait()  # a background save in flight is completed, even when the loop failed
        except CheckpointError:
            if status != "FAILED":
                raise
            log.exception("the checkpoint in flight could not be completed")  # the loop's error is the one raised
        stop_system_metrics(monitor)
        if jsonl is not None:
            jsonl.close()
        if tracker is not None:
            tracker.close(status=status)
    if stop.signum:
        raise Interrupted(stop.signum, step, last_checkpoint)
    if last_checkpoint is None:
        raise RuntimeError("training ended without writing a checkpoint")
    return last_checkpoint


def _padding_batch(empty: dict, pad_id: int) -> dict:
    seq_len = empty["tokens"].shape[1]
    levels = empty["paths"].shape[1]
    return {"tokens": torch.full((1, seq_len), pad_id, dtype=torch.int64),
            "labels": torch.full((1, seq_len), -100, dtype=torch.int64),
            "segments": torch.zeros((1, seq_len), dtype=torch.int64),
            "paths": torch.zeros((1, levels), dtype=torch.int64), "index": torch.zeros(1, dtype=torch.int64)}


def _log_record(comm: Comm, now, loss_sum: torch.Tensor, global_tokens: int, labels_local: int, grad_norm: torch.Tensor,
                plan, generic_used: int, window: dict, flops_per_token: float, peak: Optional[float]) -> dict[str, float]:
    """The step's metrics, aggregated over ranks (the one host sync of a logged step)."""
    loss = float(comm.all_reduce_(loss_sum.to(comm.device))) / max(global_tokens, 1)
    elapsed = max(time.perf_counter() - window["started"], 1e-9)
    record = {"loss": loss, "lr/anchor": now.anchor_lr, "lr/memory": now.memory_lr,
              "grad_norm": float(grad_norm), "tokens_per_s": window["tokens"] / elapsed,
              "step_s": elapsed / max(window["steps"], 1),
              "phase": float(now.phase == MEMORY), "global_batch": float(now.global_batch)}
    if peak:
        record["mfu"] = window["tokens"] * flops_per_token / elapsed / (peak * comm.world_size)
    if plan is not None:
        local = {**plan.stats, "fetch_s": window["fetch_s"], "tokens": float(labels_local),
                 "sequences": float(sum(plan.batch_sizes)), "generic_sequences": float(generic_used)}
        for key, value in reduce_over_ranks(comm, local).items():
            record[f"memory/{key}"] = value
    if not all(math.isfinite(v) for v in record.values()):
        log.warning("non-finite metrics at this step: %s", {k: v for k, v in record.items() if not math.isfinite(v)})
    return record
