"""One command for 1 or N processes: what `torchrun` tells a process (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE in the environment) read in one place, for the two kinds of job that use it.

- Sharded jobs (tile, embed): each process takes its share of the items (`shard`) and commits its own rows;
  `barrier` waits for all of them (setting up a gloo group on first use, so it works on CPU-only machines).
  Shards are stable (a CRC of each item's key), so a rerun with the same world size gives each process the
  same items, and items already stored are skipped by id anyway.
- DINO training: `setup` initialises the process group (nccl on GPUs, gloo on CPUs) and picks this process's
  device; `all_reduce_mean` / `any_rank` / `barrier` keep the ranks in step.

A plain run is rank 0 of 1: nothing is initialised and every helper is a no-op. torch is imported inside the
functions, so the sharded jobs' imports stay light.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from cytoretrieve.errors import CytoError
from cytoretrieve.runtime import resolve_device

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
JOB_TIMEOUT = timedelta(hours=6)  # a sharded job's processes may finish their shares hours apart
TRAIN_TIMEOUT = timedelta(minutes=30)  # training ranks meet at every step


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank_world() -> tuple[int, int]:
    """(rank on this node, processes on this node) under torchrun; (0, world size) otherwise."""
    world = rank_world()[1]
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def shard(items: Sequence[T], key: Callable[[T], str]) -> list[T]:
    """This process's share of `items`: those whose key hashes to its rank (all of them in a plain run)."""
    rank, world = rank_world()
    if world == 1:
        return list(items)
    return [item for item in items if zlib.crc32(key(item).encode()) % world == rank]


def barrier() -> None:
    """Wait for every process of the job; no-op in a plain run. A sharded job has no process group until its
    first barrier: gloo, so it works on CPU-only machines."""
    if rank_world()[1] == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=JOB_TIMEOUT)
    dist.barrier()


# --- training: one device per process, ranks in step -------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Initialise the process group when launched by torchrun with more than one process; pick this process's
    device (cuda:LOCAL_RANK on GPUs)."""
    import torch
    import torch.distributed as dist

    rank, world = rank_world()
    local_rank, local_world = local_rank_world()
    device = resolve_device(device)
    if device.startswith("cuda"):
        if world > 1 or device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise CytoError(
                    f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most that"
                    " many processes per node (`nproc`_per_node)"
                )
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    if world <= 1:
        return Dist(device=device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=TRAIN_TIMEOUT, **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                device=device, backend=backend)


def teardown(d: Dist) -> None:
    import torch.distributed as dist

    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    import torch.distributed as dist

    if d.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= d.world_size
    return values


def any_rank(flags: list[bool], d: Dist) -> list[bool]:
    """Each flag True on every rank when any rank says True (a stop must stop all ranks at the same step)."""
    if not d.enabled:
        return [bool(f) for f in flags]
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=d.device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]
