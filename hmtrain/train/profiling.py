"""`train.profile_steps`: a torch.profiler trace of chosen optimizer steps, and on CUDA a memory snapshot.

    <run_dir>/profiles/step_00000012/rank0.trace.json     open in chrome://tracing or https://ui.perfetto.dev
    <run_dir>/profiles/step_00000012/rank0.memory.pickle  CUDA only: drag into https://pytorch.org/memory_viz

Each listed step is profiled alone (CPU activity, and CUDA kernels on GPU), from the loader's batch to the
optimizer update, as torchtitan's profiler does for its window. Steps not listed cost one set lookup.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, steps: Sequence[int], run_dir: Path, device: torch.device, rank: int):
        self.steps, self.root, self.device, self.rank = set(steps), Path(run_dir) / "profiles", device, rank
        self._active: Optional[profile] = None

    def begin(self, step: int) -> None:
        """Call before optimizer step `step` (counted from 1)."""
        if step not in self.steps:
            return
        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._active = profile(activities=activities, profile_memory=True)
        self._active.__enter__()

    def end(self, step: int) -> None:
        """Call after optimizer step `step`: writes its trace (and snapshot)."""
        if self._active is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._active.__exit__(None, None, None)
        out = self.root / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        self._active.export_chrome_trace(str(out / f"rank{self.rank}.trace.json"))
        self._active = None
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(out / f"rank{self.rank}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("profiled step %d: %s", step, out)
