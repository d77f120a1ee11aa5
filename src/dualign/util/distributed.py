"""Rank helpers for Lightning's distributed strategies (DDP, FSDP, DeepSpeed launch one process per device and
re-run the entry point; torch.distributed is initialised inside trainer.fit). Outside a process group every helper
is the one-process identity."""
from __future__ import annotations

import os

import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))  # before fit: set by the launcher


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This rank's share of a list: every world_size-th item from its rank (the union over ranks is the list)."""
    return items[rank()::world_size()] if world_size() > 1 else list(items)


def gather(obj) -> list:
    """Every rank's obj, in rank order (all_gather_object: any picklable value)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
