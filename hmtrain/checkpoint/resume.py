"""What `hmtrain train --resume` checks before it loads anything, and the load itself.

A resumed run must be the run that was checkpointed: the config may differ from the
checkpoint's `config.yaml` only in the keys of `RESUME_MAY_CHANGE` (below, the one place
they are listed), the prepared data must have the fingerprints recorded at save, and the
checkpoint must be complete. Broken checkpoints are named together with the newest older
one that is complete; `--fallback` resumes from that one instead, logging what it skipped.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

from hmtrain.checkpoint.checkpointer import Checkpointer, _rank
from hmtrain.checkpoint.verify import CheckpointError, check_complete
from hmtrain.config import Config, ConfigError, flatten

log = logging.getLogger(__name__)

# Config keys (dotted, fnmatch patterns) that may differ between a checkpoint and the run that
# resumes it. Everything else must match, so a resumed run is the run that was checkpointed.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    # extend (or shorten) a run; the learning-rate schedules follow the new lengths
    "train.pretrain_steps", "train.memory_steps",
    # bookkeeping that does not touch the numbers
    "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.progress", "train.run_dir",
    "train.profile_steps", "train.eval_every", "train.eval_sequences", "train.eval_variants", "train.eval_probes",
    "logging.*", "eval.*", "data.probes",
    # hardware and parallel layout: DCP reshards, the loader's position is global
    # (not parallel.engine / zero_stage: the anchor's optimizer state is stored in the engine's own layout)
    "train.device", "train.dtype", "model.ffn_impl", "model.attention", "parallel.placement",
    "parallel.replicate_levels", "parallel.tensor_parallel", "parallel.activation_checkpointing", "parallel.compile",
    "parallel.backend", "parallel.timeout_s", "parallel.checkpoint_timeout_s", "parallel.fetch", "data.num_workers",
    "data.verify_checksums", "train.async_checkpoint",
    # read only by `hmtrain data prepare`: the prepared directory is checked by its fingerprints instead
    "data.prepared", "data.documents", "data.text_field", "data.id_field", "data.embed_batch_size",
)
# Per-step batch shape: may change as long as the global batch stays the same (memory use only).
MICRO_BATCH_KEYS: tuple[str, ...] = ("train.micro_batch_size",)


def global_batch(flat: dict[str, Any]) -> Optional[int]:
    """Sequences per optimizer step, from flattened config keys."""
    value = flat.get("train.global_batch_size")
    return None if value is None else int(value)


def may_change(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MAY_CHANGE)


def config_changes(saved: Config, current: Config) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ: key -> (checkpoint's value, current value)."""
    old, new = flatten(saved), flatten(current)
    absent = "<absent>"
    return {key: (old.get(key, absent), new.get(key, absent)) for key in sorted(set(old) | set(new))
            if old.get(key, absent) != new.get(key, absent)}


def check_config_change(checkpoint: Path, saved: Config, current: Config, step: int) -> None:
    """Refuse a resume whose config differs from the checkpoint's beyond the allowlist."""
    changes = config_changes(saved, current)
    batch_keys = {k: v for k, v in changes.items() if k in MICRO_BATCH_KEYS or k == "train.global_batch_size"}
    refused = {k: v for k, v in changes.items() if not may_change(k) and k not in batch_keys}
    old_batch, new_batch = global_batch(flatten(saved)), global_batch(flatten(current))
    if batch_keys and old_batch != new_batch:
        refused.update(batch_keys)
    if refused:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        hint = (f" (sequences per optimizer step {old_batch} -> {new_batch}: the global batch must stay the same; "
                "only how it splits into micro-batches may change)" if set(refused) & set(batch_keys) else "")
        raise ConfigError(f"--resume: the config differs from checkpoint {checkpoint} in {shown}{hint}; "
                          f"resume with the checkpoint's values or start a new train.run_dir")
    saved_pretrain, new_pretrain = saved.train.pretrain_steps, current.train.pretrain_steps
    phased = current.train.mode != "dense"  # a dense run has no phase switch
    if phased and saved_pretrain != new_pretrain and step > min(saved_pretrain, new_pretrain):
        raise ConfigError(f"--resume: train.pretrain_steps {saved_pretrain} -> {new_pretrain} would move the "
                          f"phase switch to before the checkpoint's step {step} ({checkpoint})")
    for key, (old, new) in changes.items():
        if key in batch_keys:
            log.info("resume: %s %r -> %r: same global batch of %s, only memory use changes", key, old, new,
                     new_batch)
        else:
            log.info("resume: %s %r -> %r", key, old, new)


def check_data_fingerprints(checkpoint: Path, record: dict, current: dict[str, str], prepared: Path) -> None:
    """Refuse prepared data other than what the checkpoint was trained on (tokenizer, tree)."""
    recorded = record.get("data_fingerprints")
    if not recorded:
        log.warning("checkpoint %s records no data fingerprints (written by an older hmtrain); "
                    "cannot check that %s is the data it was trained on", checkpoint, prepared)
        return
    for name in sorted(recorded):
        if name in current and recorded[name] != current[name]:
            raise ValueError(f"data.prepared {prepared}: its {name} (fingerprint {current[name][:12]}) is not "
                             f"the one checkpoint {checkpoint} was trained with (fingerprint "
                             f"{recorded[name][:12]}); point data.prepared at the run's prepared directory")


def started_before_first_checkpoint(checkpointer: Checkpointer, run_dir: Path) -> bool:
    """True when `run_dir` holds a run that was stopped before it wrote any checkpoint: a
    requeued `--resume` then starts it again from step 0 (in the same MLflow run)."""
    if checkpointer.step_dirs():
        return False
    traces = [Path(run_dir) / name for name in ("metrics.jsonl", "mlflow_run.json", "config.yaml")]
    started = any(p.is_file() for p in traces)
    if started:
        log.warning("--resume: %s has no checkpoint yet (the run stopped before its first one); "
                    "starting it again from step 0", run_dir)
    return started


def _set_aside(broken: list[Path]) -> None:
    """Rename skipped checkpoints out of the `step_*` namespace, so the resumed run's pruning keeps
    its good checkpoints and a later resume does not meet them again."""
    if _rank() != 0:
        return
    for path in broken:
        target = path.with_name(f"{path.name}.broken")
        suffix = 1
        while target.exists():
            target, suffix = path.with_name(f"{path.name}.broken{suffix}"), suffix + 1
        os.replace(path, target)
        log.warning("--fallback: moved the broken %s aside to %s (kept for inspection)", path.name, target.name)


def _loadable(path: Path) -> Optional[str]:
    try:
        check_complete(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def older_complete(path: Path) -> Optional[Path]:
    """The newest complete checkpoint older than `path` in its directory, if any."""
    older = [p for p in Checkpointer(Path(path).parent).step_dirs() if p.name < Path(path).name]
    return next((p for p in reversed(older) if _loadable(p) is None), None)


def broken_checkpoint(path: Path, problem: str,
                      hint: str = "resume from it with --resume --fallback") -> CheckpointError:
    """The error for a broken checkpoint, naming the newest older complete one."""
    complete = older_complete(path)
    if complete is None:
        return CheckpointError(f"{problem}; no older complete checkpoint in {path.parent}")
    return CheckpointError(f"{problem}; an older complete checkpoint exists: {complete} ({hint})")


def load_for_resume(checkpointer: Checkpointer, cfg: Config, fingerprints: dict[str, str], prepared: Path,
                    restore: Callable[[Path, dict], dict], *, fallback: bool = False) -> tuple[Path, dict]:
    """Pick the newest complete checkpoint, check the config and data against it, load it.

    `restore(path, record)` loads checkpoint `path`, whose trainer record it is given, into the run's
    states and returns the loaded record (the engine takes the shape of the record's phase first).
    Returns (checkpoint path, trainer record). Raises CheckpointError (broken checkpoint; with
    `fallback` an older complete one is used instead), ConfigError (config changed beyond
    `RESUME_MAY_CHANGE`) or ValueError (other prepared data)."""
    candidates = list(reversed(checkpointer.step_dirs()))
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpointer.directory}")
    skipped: list[Path] = []

    def skip(path: Path, exc: CheckpointError) -> None:
        if not fallback:
            raise broken_checkpoint(path, str(exc)) from exc
        log.warning("--fallback: skipping %s (%s)", path, exc)
        skipped.append(path)

    for path in candidates:
        try:
            record, saved = check_complete(path)
        except CheckpointError as exc:
            skip(path, exc)
            continue
        # a changed config or other data is the user's to fix: never fall back past it
        check_config_change(path, saved, cfg, int(record["step"]))
        check_data_fingerprints(path, record, fingerprints, prepared)
        try:
            record = restore(path, record)
        except CheckpointError as exc:
            skip(path, exc)
            continue
        if skipped:
            log.warning("--fallback: resuming from %s, the newest loadable checkpoint", path)
            _set_aside(skipped)
        return path, record
    raise CheckpointError(f"--resume: no loadable checkpoint in {checkpointer.directory} "
                          f"(tried {', '.join(p.name for p in candidates)})")
