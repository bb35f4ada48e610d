"""A step's host index arrays, copied to the device once: one buffer, pinned on CUDA, views by key.

Planning a step (hmtrain/memory/plan.py) yields many small int64 arrays: per micro-batch and table, the
rows to read, the step-buffer slots to add gradients to, the chunk positions of the all-to-all buffers,
the gather index of every layer's blocks. Copied one by one they cost one small pageable host-to-device
copy each, per micro-batch; packed here they cost one copy per step (non-blocking from pinned memory,
so the host does not wait for it), and every use is a view of the device buffer. `run` says, from the
host copy, whether an array is a run of consecutive ids; `take` and `put` then read and write those rows
as a slice, not with a gather into a new tensor or a scatter (one whole-row copy fewer each, the same values).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from torch import Tensor


class DeviceIndices:
    def __init__(self, arrays: Mapping[Hashable, np.ndarray], device: torch.device):
        self._bounds: dict[Hashable, tuple[int, int]] = {}
        start = 0
        for key, array in arrays.items():
            self._bounds[key] = (start, start + len(array))
            start += len(array)
        flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays.values()]
                              + [np.zeros(0, np.int64)])
        host = torch.from_numpy(flat)
        if device.type == "cuda":
            host = host.pin_memory()
        self._host = host  # kept alive until the non-blocking copy has surely run
        self._flat = flat
        self._runs: dict[Hashable, tuple[int, int] | None] = {}
        self._device = host.to(device, non_blocking=True)

    def __getitem__(self, key: Hashable) -> Tensor:
        start, stop = self._bounds[key]
        return self._device[start:stop]

    def run(self, key: Hashable) -> tuple[int, int] | None:
        """(first, stop) when the array under `key` is first, first + 1, ..., stop - 1 (not empty), else None;
        read on the host, no device sync."""
        if key not in self._runs:
            start, stop = self._bounds[key]
            ids = self._flat[start:stop]
            consecutive = len(ids) > 0 and ids[-1] - ids[0] == len(ids) - 1 and bool(np.all(np.diff(ids) == 1))
            self._runs[key] = (int(ids[0]), int(ids[-1]) + 1) if consecutive else None
        return self._runs[key]

    def take(self, source: Tensor, key: Hashable) -> Tensor:
        """source[ids] along dim 0 for the ids under `key`: a view when they are a run, else a gathered copy."""
        run = self.run(key)
        return source.narrow(0, run[0], run[1] - run[0]) if run else source.index_select(0, self[key])

    def put(self, dest: Tensor, key: Hashable, values: Tensor) -> None:
        """dest[ids] = values along dim 0 for the ids under `key`; `values` holds len(ids) of dest's rows in any
        shape of that many elements (a strided view is read in place when the ids are a run)."""
        run = self.run(key)
        if run:
            dest.narrow(0, run[0], run[1] - run[0]).view(values.shape).copy_(values)
        else:
            dest.index_copy_(0, self[key], values.reshape(-1, *dest.shape[1:]))
