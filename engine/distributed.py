"""Tensor parallelism over processes (torchrun): the process group and the per-step broadcast."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env() -> int:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns the world size.

    NCCL when CUDA is there, else gloo (CPU); each rank takes the GPU of its LOCAL_RANK.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return world_size()
    # Followers wait in a broadcast for as long as the server is idle: no collective timeout.
    idle = timedelta(days=3650)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=idle)
    else:
        dist.init_process_group("gloo", timeout=idle)
    return world_size()


def broadcast(value: Any = None) -> Any:
    """Rank 0 sends `value` (any picklable object); every rank returns it."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_min(value: int) -> int:
    """The smallest of every rank's value (e.g. KV blocks that fit on every GPU)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
