"""torchrun support shared by the rotation search, GPTQ's recipe and training: join the process group
that torchrun's environment describes, and ask where this process stands in it."""

from __future__ import annotations

import os

import torch


def join_torchrun(device: torch.device) -> int:
    """This process's rank when started by torchrun (joining its process group once: nccl for CUDA,
    gloo otherwise), else 0."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def world_and_rank() -> tuple[int, int]:
    """(number of processes, this one's rank): (1, 0) outside an initialized process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(), dist.get_rank()
