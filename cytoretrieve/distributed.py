"""Sharding a job over the processes `torchrun` starts: each takes its share of the work and commits its own rows.

torchrun sets RANK and WORLD_SIZE (and the rendezvous variables); a plain run is rank 0 of 1 and needs no process
group. Shards are stable (a CRC of each item's key), so a rerun with the same world size gives each process the
same items, and items already stored are skipped by id anyway.
"""

from __future__ import annotations

import datetime
import os
import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items: Sequence[T], key: Callable[[T], str]) -> list[T]:
    """This process's share of `items`: those whose key hashes to its rank (all of them in a plain run)."""
    rank, world = rank_world()
    if world == 1:
        return list(items)
    return [item for item in items if zlib.crc32(key(item).encode()) % world == rank]


def barrier() -> None:
    """Wait for every process of the job (gloo, so it works on CPU-only machines); no-op in a plain run."""
    rank, world = rank_world()
    if world == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    dist.barrier()
