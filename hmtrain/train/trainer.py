"""`hmtrain train`: the training loop, top to bottom.

One config runs the paper's two phases: anchor pretraining (no memory), then the memory
phase, where every sequence fetches the blocks on its document's path from the bank and
the anchor is frozen or co-trained; while the memory trains, a sequence uses the generic
(context-free) memory instead with probability `generic_prob`. `train.mode=dense` trains
the dense baseline instead. Checkpointing, logging and precision are applied by the
functions this file calls, not woven through it.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm.auto import tqdm

from hmtrain.config import Config, flatten, to_yaml
from hmtrain.data.loader import ShardLoader
from hmtrain.data.prepared import PreparedData
from hmtrain.memory import MemoryBank, build_bank, uses_memory
from hmtrain.model import Transformer, count_parameters, lm_loss, run_model_config
from hmtrain.parallel import resolve_precision
from hmtrain.train.checkpoint import Checkpointer
from hmtrain.train.metrics import JsonlLogger, MLflowLogger, MultiLogger, default_tracking_uri
from hmtrain.train.resume import load_for_resume, started_before_first_checkpoint
from hmtrain.train.rundir import lock_run_dir
from hmtrain.train.schedule import learning_rate

log = logging.getLogger(__name__)


def build_anchor_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    optim = cfg.train.anchor_optim
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=False,
    )


def generic_probability(cfg: Config) -> float:
    if cfg.train.generic_prob is not None:
        return cfg.train.generic_prob
    return 1.0 / (cfg.tree.branching[0] + 1) if cfg.memory.generic else 0.0


class Interrupted(RuntimeError):
    """Training stopped early on a signal, after writing a checkpoint to resume from."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {checkpoint}; "
                         "continue with --resume")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopRequest:
    """SIGTERM/SIGINT (e.g. SLURM preemption) ask for a checkpoint at the end of the step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the end of this step, then stopping", signum)
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, *, resume: bool = False, fallback: bool = False) -> Path:
    """Run (or resume) training; returns the final checkpoint directory. `fallback`: resume from
    the newest loadable checkpoint when the latest is broken."""
    with lock_run_dir(Path(cfg.train.run_dir), rank=0):  # one live `train` per run directory
        return _train(cfg, resume=resume, fallback=fallback)


def _train(cfg: Config, *, resume: bool, fallback: bool) -> Path:
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    precision = resolve_precision(tc)
    device = precision.device
    data = PreparedData.open(cfg.data.prepared)
    data.check_compatible(cfg)
    torch.manual_seed(tc.seed)

    dense = tc.mode == "dense"
    model_cfg = run_model_config(cfg.model, tc.mode, tc.dense_multiplier)
    model = Transformer(model_cfg, max_seq_len=cfg.data.seq_len).to(device)
    total_steps = tc.pretrain_steps + tc.memory_steps
    bank: Optional[MemoryBank] = build_bank(cfg, device) if uses_memory(cfg) else None
    optimizer = build_anchor_optimizer(model, cfg)
    # the anchor's schedule spans every step it trains in
    anchor_steps = total_steps if (dense or tc.anchor == "cotrain" or bank is None) else tc.pretrain_steps
    p_generic = generic_probability(cfg) if bank is not None and bank.has_generic else 0.0

    loader = ShardLoader(data.shard_dir, data.shards("train"), batch_size=tc.batch_size, seed=tc.seed,
                         eot_id=data.manifest["eot_id"], pad_id=data.manifest["pad_id"])
    generator = torch.Generator().manual_seed(tc.seed + 1)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)

    def state() -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        out = {"model": model_sd, "optim": optim_sd,
               "rng": {"torch": torch.get_rng_state(), "generic": generator.get_state()}}
        if bank is not None:
            out["bank"] = bank.state_dict()
        return out

    step, run_id = 0, None
    latest = checkpointer.latest()
    if resume and started_before_first_checkpoint(checkpointer, run_dir):
        resume = False  # killed before its first checkpoint: run it again from step 0
    if resume:
        latest, loaded, trainer_record = load_for_resume(checkpointer, cfg, data.fingerprints(), data.root, state,
                                                         fallback=fallback)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        if bank is not None:
            bank.load_state_dict(loaded["bank"])
        torch.set_rng_state(loaded["rng"]["torch"])
        generator.set_state(loaded["rng"]["generic"])
        loader.load_state_dict(trainer_record["loader"])
        step, run_id = trainer_record["step"], trainer_record.get("mlflow_run_id")
        log.info("resumed from %s at step %d", latest, step)
    elif latest is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints (latest {latest.name}); pass --resume to "
                              "continue it, or set train.run_dir to a new directory")

    run_dir.mkdir(parents=True, exist_ok=True)
    # metrics.jsonl first: a bad one stops the resume before anything in run_dir is rewritten
    jsonl = JsonlLogger(run_dir / "metrics.jsonl", resume_step=step if resume else None)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tracker = None
    if cfg.logging.mlflow:
        params = {**flatten(cfg), "model.parameters": count_parameters(model_cfg),
                  "memory.bank_parameters": bank.num_parameters() if bank else 0,
                  "memory.fetched_parameters": bank.fetched_parameters() if bank else 0}
        tracker = MLflowLogger(tracking_uri=cfg.logging.tracking_uri or default_tracking_uri(run_dir),
                               experiment=cfg.logging.experiment, run_name=cfg.logging.run_name or run_dir.name,
                               run_id=run_id, artifact_dir=run_dir / "mlartifacts", run_dir=run_dir, resume=resume,
                               params=params)
        if resume:
            tracker.backfill(jsonl.records)  # durable steps an earlier process could not send
        if tracker.is_new:
            tracker.log_artifact(run_dir / "config.yaml")
            tracker.log_artifact(data.root / data.manifest["tree"])
            tracker.log_artifact(data.root / "manifest.json")
        run_id = tracker.run_id
    metrics = MultiLogger(jsonl, *([tracker] if tracker else []))

    def save(at_step: int) -> Path:
        path = checkpointer.save(at_step, state(), {"loader": loader_state, "mlflow_run_id": run_id, "mode": tc.mode,
                                                    "data_fingerprints": data.fingerprints()}, to_yaml(cfg))
        if tracker is not None:
            tracker.flush(at_step)  # MLflow gets a step once a checkpoint covers it
        return path

    stop = StopRequest()
    batches = iter(loader)
    loader_state = loader.state_dict()
    last_checkpoint: Optional[Path] = latest if resume else None
    bar = tqdm(total=total_steps, initial=step, desc=f"train ({tc.mode})", disable=not tc.progress,
               dynamic_ncols=True)
    status = "FAILED"
    try:
        while step < total_steps:
            started = time.perf_counter()
            memory_phase = bank is not None and step >= tc.pretrain_steps
            anchor_trains = not memory_phase or tc.anchor == "cotrain"
            model.requires_grad_(anchor_trains)
            anchor_step = step if step < anchor_steps else anchor_steps - 1
            anchor_lr = learning_rate(tc.anchor_optim, anchor_step, max(1, anchor_steps))
            for group in optimizer.param_groups:
                group["lr"] = anchor_lr

            loss_sum, tokens, touched = 0.0, 0, {}
            generic_used, sequences = 0, 0
            for _ in range(tc.grad_accum):
                batch, loader_state = next(batches)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                memory = None
                if memory_phase:
                    use_generic = torch.rand(batch["paths"].shape[0], generator=generator) < p_generic
                    memory = bank.fetch(batch["paths"], use_generic.to(device))
                    generic_used += int(use_generic.sum())
                    for name, ids in memory.touched.items():
                        touched.setdefault(name, set()).update(ids.tolist())
                with precision.autocast():
                    logits = model(batch["tokens"], segments=batch["segments"], memory=memory)
                loss = lm_loss(logits, batch["labels"])
                (loss / tc.grad_accum).backward()
                if memory is not None:
                    bank.accumulate_grads(memory)
                loss_sum += loss.item()
                tokens += int((batch["labels"] != -100).sum())
                sequences += batch["paths"].shape[0]

            grads = [p.grad for p in model.parameters() if p.grad is not None]
            anchor_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
            memory_norm = bank.pending_grad_norm().to(device) if memory_phase else torch.zeros((), device=device)
            grad_norm = torch.sqrt(anchor_norm.float() ** 2 + memory_norm.float() ** 2)
            # one global norm over anchor and fetched rows, as if they were one model
            scale = min(1.0, tc.clip_grad / (float(grad_norm) + 1e-6)) if tc.clip_grad > 0 else 1.0
            if scale < 1.0:
                if grads:
                    torch._foreach_mul_(grads, scale)
                if memory_phase:
                    bank.scale_pending_grads(scale)
            if anchor_trains:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            memory_lr = 0.0
            if memory_phase:
                memory_lr = learning_rate(tc.memory_optim, step - tc.pretrain_steps, tc.memory_steps)
                bank.step(memory_lr)
            step += 1

            elapsed = time.perf_counter() - started
            record = {"loss": loss_sum / tc.grad_accum, "lr/anchor": anchor_lr if anchor_trains else 0.0,
                      "lr/memory": memory_lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens / elapsed,
                      "phase": float(memory_phase)}
            if memory_phase:
                record["memory/generic_fraction"] = generic_used / sequences
                for name, ids in touched.items():
                    record[f"memory/{name}_nodes"] = float(len(ids))
            if step % tc.log_every == 0 or step == total_steps:
                metrics.log(record, step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            phase="memory" if memory_phase else ("dense" if dense else "anchor"))
            if step % tc.checkpoint_every == 0 or step == total_steps or stop.requested:
                last_checkpoint = save(step)
            if stop.requested:
                status = "KILLED"
                break
        else:
            status = "FINISHED"
    finally:
        bar.close()
        stop.restore()
        jsonl.close()
        if tracker is not None:
            tracker.close(status=status)
    if stop.requested:
        raise Interrupted(stop.signum, step, last_checkpoint)
    if last_checkpoint is None:
        raise RuntimeError("training ended without writing a checkpoint")
    return last_checkpoint
