"""Process groups for a job launched by torchrun (or srun + torchrun): one place that reads the launcher's
environment, starts the default group with a timeout, makes the gloo side groups, and ends it cleanly.

A single process (no WORLD_SIZE, or WORLD_SIZE=1) runs without a process group: the bank and the loader
treat it as a world of one, and the anchor stays a plain module.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hmtrain.config import ParallelConfig, TrainConfig
from hmtrain.config.checks import require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: one process, no process group
    tensor_parallel: int = 1  # ranks r*N .. r*N + N - 1 form data-parallel rank r's tensor-parallel group
    # (dp, tp) mesh when tensor_parallel > 1 (torch's row-major layout: rank = dp_rank * N + tp_rank)
    mesh: Optional[DeviceMesh] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: what the loader, the global batch split and FSDP2 see."""
        return self.world_size // self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def counts_data(self) -> bool:
        """Whether this rank's tokens and losses enter the sums over ranks: the ranks of a tensor-parallel group
        see the same batch, so only its first counts it (once)."""
        return self.tp_rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def collective_device(self) -> torch.device:
        """Where collective buffers live: the GPU for NCCL, the host for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun/SLURM?)") from None


def init_distributed(parallel: ParallelConfig, train: TrainConfig) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun's), pick the device, start the default process group."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    use_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    if train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world == 1:
        return DistInfo(0, 1, 0, device, None)
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("config key 'parallel.backend': nccl needs GPUs; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=parallel.timeout_s),
                                device_id=device if backend == "nccl" else None)
    log.info("rank %d of %d on %s (%s, timeout %ds)", rank, world, device, backend, parallel.timeout_s)
    tp = parallel.tensor_parallel
    return DistInfo(rank, world, local_rank, device, backend, tp, data_tensor_mesh(device, world, tp))


def data_tensor_mesh(device: torch.device, world: int, tensor_parallel: int) -> Optional[DeviceMesh]:
    """The 2-D (dp, tp) mesh of a tensor-parallel job (None without tensor parallelism, where FSDP2 takes the
    whole world as its 1-D mesh). Every rank calls it, after the default group exists."""
    if tensor_parallel == 1:
        return None
    require(world % tensor_parallel == 0, "parallel.tensor_parallel",
            f"world size {world} is not divisible by {tensor_parallel}")
    return init_device_mesh(device.type, (world // tensor_parallel, tensor_parallel), mesh_dim_names=("dp", "tp"))


def new_group(backend: str, timeout_s: int) -> dist.ProcessGroup | None:
    """A side group (e.g. gloo for checkpoint writes in a background thread); None on one process."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class SideGroups:
    """The gloo groups beside the default one, one per kind of host-side traffic (None on one process).

    Every rank must issue a group's collectives in the same order. A background checkpoint issues
    its own from another thread, at moments that differ per rank, so it gets a group nothing else
    uses; shared with the main thread's, the two interleave differently per rank and the job hangs.
    gloo jobs get the same two groups as NCCL ones, so the CPU tests run the wiring GPUs run.
    """

    control: dist.ProcessGroup | None  # main thread: the bank's row ids, token counts, stop agreement, run ids
    checkpoint: dist.ProcessGroup | None  # dcp.async_save's background thread, and nothing else


def side_groups(info: DistInfo, timeout_s: int, checkpoint_timeout_s: int | None = None) -> SideGroups:
    """Make the side groups (every rank calls this, in the same order as its other new_group calls); the
    checkpoint group waits `checkpoint_timeout_s` (default: `timeout_s`), as long as a save may take."""
    if not info.distributed:
        return SideGroups(control=None, checkpoint=None)
    return SideGroups(control=new_group("gloo", timeout_s),
                      checkpoint=new_group("gloo", checkpoint_timeout_s or timeout_s))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """End the default group; a worker should then leave with os._exit (gloo threads can abort at exit)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
