"""One command for 1 or N processes: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the
process group is set up with nccl on GPUs and gloo on CPUs; alone, nothing is initialised."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cytoretrieve.backbones import resolve_device
from cytoretrieve.errors import CytoError


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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
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
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                device=device, backend=backend)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= d.world_size
    return values


def any_rank(flags: list[bool], d: Dist) -> list[bool]:
    """Each flag True on every rank when any rank says True (a stop must stop all ranks at the same step)."""
    if not d.enabled:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=d.device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
