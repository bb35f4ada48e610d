"""`hmtrain train`: the training loop, top to bottom, on one process or many (torchrun / SLURM).

One config runs the paper's two phases (hmtrain/train/recipe.py): anchor pretraining, then the
memory phase, where every sequence fetches the blocks on its path from the row-sharded bank and
the anchor is frozen or co-trained. `train.mode=dense` trains the dense baseline instead.

A step (`train_step`): the loader hands this rank its micro-batches of one global batch, all of one
shape (owner placement pads them, hmtrain/data/loading/loader.py); the bank plans the step's fetches
for their sequences (one exchange of row ids); each micro-batch fetches its rows, runs forward
and backward with the loss normalised by the global token count, and returns its row gradients to
their owners; one global norm over anchor and bank clips both; the anchor's engine and the bank's
sparse AdamW step. `train` builds the run (hmtrain/train/build.py), resumes it, then steps, logs
(hmtrain/train/tracking.py) and checkpoints (hmtrain/checkpoint/) in a short loop, which stops before
checkpointing a non-finite loss or gradient norm (hmtrain/train/divergence.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from hmtrain.checkpoint.checkpointer import ENGINE, LOADER, TRAIN, Checkpointer
from hmtrain.checkpoint.resume import load_for_resume, started_before_first_checkpoint
from hmtrain.checkpoint.verify import CheckpointError
from hmtrain.config import Config, to_yaml
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.loading.batch import real_rows
from hmtrain.data.routing.questions import ProbeSet
from hmtrain.model import count_parameters, counted_targets, run_model_config
from hmtrain.parallel.dist import init_distributed
from hmtrain.train.build import Parts, build, check_world, restore_in_phase
from hmtrain.train.divergence import Diverged, DivergenceWatch
from hmtrain.train.probe_validation import validation_probes
from hmtrain.train.profiling import StepProfiler
from hmtrain.train.recipe import MEMORY
from hmtrain.train.rundir import lock_run_dir
from hmtrain.train.signals import Interrupted, StopRequest
from hmtrain.train.state import TrainState
from hmtrain.train.throughput import (
    StepResult,
    Window,
    peak_flops,
    step_record,
    train_flops_per_token,
)
from hmtrain.train.tracking import Tracker, start_tracking
from hmtrain.train.validation import check_heldout, validate
from hmtrain.util.faults import fault_point

log = logging.getLogger(__name__)


def train(cfg: Config, *, resume: bool = False, fallback: bool = False) -> Path:
    """Run (or resume) training; returns the final checkpoint directory. `fallback`: resume from
    the newest loadable checkpoint when the latest is broken."""
    info = init_distributed(cfg.parallel, cfg.train)
    # read-only checks first, so a bad input leaves no trace in the run directory
    data = PreparedData.open(cfg.data.prepared, verify="checksums" if cfg.data.verify_checksums else "sizes")
    data.check_compatible(cfg)
    check_world(cfg, info.world_size, data)
    check_heldout(data, cfg.train.eval_every)
    probes = validation_probes(cfg, data, info.device)  # train.eval_probes: read and routed once
    with lock_run_dir(Path(cfg.train.run_dir), rank=info.rank):  # one live `train` per run directory
        run = build(cfg, info, data)
        tc = run.cfg.train
        state = TrainState(data_fingerprints=data.fingerprints(), mode=tc.mode, world_size=info.world_size)
        states = {ENGINE: run.engine, **({"bank": run.bank} if run.bank is not None else {}), TRAIN: state,
                  LOADER: run.batches}
        checkpointer = Checkpointer(Path(tc.run_dir) / "checkpoints", states, every=tc.checkpoint_every,
                                    keep=tc.keep_checkpoints, config_yaml=to_yaml(run.cfg),
                                    async_save=tc.async_checkpoint, process_group=run.groups.checkpoint)
        latest, stage_begins = resume_run(run, checkpointer, state, resume, fallback)
        tracker = start_tracking(run.cfg, is_main=info.is_main, control_group=run.groups.control,
                                 resume=latest is not None, step=state.step, run_id=state.mlflow_run_id,
                                 params=lambda: _params(run),
                                 artifacts=[data.root / data.manifest["tree"], data.root / "manifest.json"])
        if tracker.mlflow is not None:
            state.mlflow_run_id = tracker.mlflow.run_id
        checkpointer.on_durable = lambda step, path: tracker.flush(step)
        return _run_to_end(run, checkpointer, tracker, state, latest, stage_begins, probes)


def resume_run(run: Parts, checkpointer: Checkpointer, state: TrainState, resume: bool,
               fallback: bool) -> tuple[Optional[Path], bool]:
    """Load the newest checkpoint when resuming: returns (the checkpoint or None, whether its step begins
    a new stage). Refuses to start over a run directory that already has checkpoints."""
    run_dir = Path(run.cfg.train.run_dir)
    latest = checkpointer.latest()
    if not resume and latest is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints (latest {latest.name}); pass --resume to "
                              "continue it, or set train.run_dir to a new directory")
    if not resume or started_before_first_checkpoint(checkpointer, run_dir):
        return None, False  # (killed before its first checkpoint: run it again from step 0)
    stage_begins = False

    def restore(path: Path, record: dict) -> dict:
        nonlocal stage_begins
        step = int(record["step"])
        stage_begins = restore_in_phase(run.engine, run.model, run.recipe, step, record.get("optimizer_phase"),
                                        run.accumulation(step), lambda: checkpointer.restore(path), path)
        return record

    latest, _ = load_for_resume(checkpointer, run.cfg, run.data.fingerprints(), run.data.root, restore,
                                fallback=fallback)
    log.info("resumed from %s at step %d", latest, state.step)
    return latest, stage_begins


def _run_to_end(run: Parts, checkpointer: Checkpointer, tracker: Tracker, state: TrainState,
                last_checkpoint: Optional[Path], stage_begins: bool, probes: Optional[ProbeSet] = None) -> Path:
    """Step until the recipe's last step or a stop request; close the checkpoints and trackers either way."""
    cfg, recipe, tc = run.cfg, run.recipe, run.cfg.train
    fetched = run.bank.fetched_parameters() if run.bank else 0
    flops_per_token = train_flops_per_token(run_model_config(cfg.model, tc.mode, tc.dense_multiplier),
                                            cfg.data.seq_len, fetched)
    peak, stop, status = peak_flops(run.info.device), StopRequest(), "FAILED"
    current = recipe.at(state.step)
    run.engine.set_trainable(current.anchor_trains)
    recipe.apply_stage(run.model, state.step, fresh=stage_begins)  # a memory model's curriculum stage
    bar = tqdm(total=recipe.total_steps, initial=state.step, desc=f"train ({tc.mode})",
               disable=not (tc.progress and run.info.is_main), dynamic_ncols=True)
    window, watch = Window(), DivergenceWatch(run.info.device)
    profiler = StepProfiler(tc.profile_steps, Path(tc.run_dir), run.info.device, run.info.rank)
    try:
        while state.step < recipe.total_steps:
            now = recipe.at(state.step)
            if now.phase != current.phase:  # the phase switch: fresh anchor moments, maybe a new batch size
                fault_point("phase_switch", state.step)
                run.engine.reset(recipe.anchor_optim(now.phase), accumulation=run.accumulation(state.step))
                run.engine.set_trainable(now.anchor_trains)
                recipe.apply_stage(run.model, state.step, fresh=True)
            current = now
            profiler.begin(state.step + 1)
            result = train_step(run, now, state.step, run.batches.next(now.global_batch), window)
            profiler.end(state.step + 1)
            state.step, state.optimizer_phase = state.step + 1, now.phase
            watch.note(state.step, result.loss_sum, result.grad_norm)
            last = state.step == recipe.total_steps
            validation = {}
            if tc.eval_every and (state.step % tc.eval_every == 0 or last):
                validation = validate(run, now.phase == MEMORY, probes)
                window.started += validation["val/seconds"]  # the window's throughput counts training alone
            # a validated step is logged whole (MLflow's resume tells the steps it holds by their loss)
            logged = state.step % tc.log_every == 0 or last or bool(validation)
            if logged:
                record = step_record(run.comm, now, result, window, flops_per_token, peak)
                tracker.log({**record, **validation}, state.step)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", phase=now.phase)
                window = Window()
            bar.update(1)
            checkpointer.poll()  # complete a background save whose write has finished
            signum = stop.agreed(run.comm)
            if logged or checkpointer.due(state.step, last=last, now=bool(signum)):  # steps that sync anyway
                _stop_if_diverged(watch, run, state.step, last_checkpoint)
            last_checkpoint = checkpointer.save(state.step, last=last, now=bool(signum)) or last_checkpoint
            if signum:
                stop.signum, status = signum, "KILLED"
                break
        else:
            status = "FINISHED"
    finally:
        bar.close()
        stop.restore()
        _close(checkpointer, tracker, status)
    if stop.signum:
        raise Interrupted(stop.signum, state.step, last_checkpoint)
    if last_checkpoint is None:
        raise RuntimeError("training ended without writing a checkpoint")
    return last_checkpoint


def _stop_if_diverged(watch: DivergenceWatch, run: Parts, step: int, last_checkpoint: Optional[Path]) -> None:
    """Raise Diverged before a checkpoint could hold a non-finite step (hmtrain/train/divergence.py)."""
    bad = watch.first_bad_step(run.comm)
    if bad is not None:
        raise Diverged(bad, step, run.recipe.optim_keys(run.recipe.phase(bad - 1)), last_checkpoint)


def train_step(run: Parts, now, step: int, micro_batches: list[dict], window: Window) -> StepResult:
    """One optimizer step over this rank's micro-batches of one global batch (the module docstring's step)."""
    engine, bank, device, tc = run.engine, run.bank, run.info.device, run.cfg.train
    labels_local = sum(counted_targets(run.model, mb) for mb in micro_batches)
    counts = run.info.counts_data  # a tensor-parallel group's batch is counted once, by its first rank
    global_tokens = run.comm.all_reduce_ints(np.array([labels_local if counts else 0]))[0]
    memory_phase = now.phase == MEMORY
    plan, generic_used = None, 0
    if memory_phase:  # the bank plans the sequences only: padding rows (owner placement) fetch nothing
        real = [real_rows(mb) for mb in micro_batches]
        generic = [run.recipe.generic_mask(step, mb["index"][:n].numpy()) for mb, n in zip(micro_batches, real)]
        generic_used = int(sum(g.sum() for g in generic))
        plan = bank.plan_step([(mb["paths"][:n], g) for mb, n, g in zip(micro_batches, real, generic)])
    loss_sum = torch.zeros((), device=device)
    for k, mb in enumerate(micro_batches):
        mb = {key: value.to(device, non_blocking=True) for key, value in mb.items()}
        memory = None
        if plan is not None:  # even for a micro-batch of padding alone: one graph, with memory, every time
            fetch_started = time.perf_counter()
            memory = bank.fetch(plan, k, padded_to=len(mb["tokens"]))
            window.fetch_s += time.perf_counter() - fetch_started
        with run.precision.autocast():
            micro_loss, _ = engine.model(mb["tokens"], segments=mb["segments"], memory=memory, labels=mb["labels"])
        normaliser = engine.loss_multiplier / max(global_tokens, 1)  # the engine may average over ranks
        engine.backward(micro_loss * normaliser, last=k == len(micro_batches) - 1)
        if memory is not None:
            bank.return_grads(memory, scale=1.0 / engine.loss_multiplier)
        loss_sum += micro_loss.detach()

    if memory_phase:
        bank.reduce_grads()  # replicated tables: the reduce-scatter runs while the anchor's norm is taken
    anchor_sq = engine.grad_sq_norm() if now.anchor_trains else torch.zeros((), device=device)
    bank_sq = bank.finish_grads() if memory_phase else torch.zeros((), device=device)
    grad_norm = torch.sqrt(anchor_sq + bank_sq)  # one global norm, as if anchor and bank were one model
    if now.anchor_trains:
        engine.step(now.anchor_lr, grad_norm, tc.clip_grad)
    else:
        engine.zero_grad()
    if memory_phase:
        scale = torch.clamp(tc.clip_grad / (grad_norm + 1e-6), max=1.0) if tc.clip_grad > 0 else 1.0
        bank.step(now.memory_lr, scale)
    window.tokens += global_tokens
    window.steps += 1
    # (the group's other ranks computed the same loss: a NaN shows on its first rank too)
    loss_sum = loss_sum if counts else torch.zeros_like(loss_sum)
    return StepResult(loss_sum, global_tokens, labels_local, grad_norm, plan, generic_used, run.info.device)


def _close(checkpointer: Checkpointer, tracker: Tracker, status: str) -> None:
    try:
        checkpointer.close()  # a background save in flight is completed, even when the loop failed
    except CheckpointError:
        if status != "FAILED":
            raise
        log.exception("the checkpoint in flight could not be completed")  # the loop's error is the one raised
    finally:
        tracker.close(status=status)


def _params(run: Parts) -> dict:
    """Sizes logged beside the config in MLflow."""
    cfg, bank = run.cfg, run.bank
    model_cfg = run_model_config(cfg.model, cfg.train.mode, cfg.train.dense_multiplier)
    n_params = count_parameters(model_cfg) if cfg.model.family == "lm" else sum(
        p.numel() for p in run.model.parameters())
    return {"model.parameters": n_params, "memory.bank_parameters": bank.num_parameters() if bank else 0,
            "memory.fetched_parameters": bank.fetched_parameters() if bank else 0,
            "parallel.world_size": run.info.world_size}
