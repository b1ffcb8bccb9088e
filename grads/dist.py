"""Tiny helpers over torch.distributed that also work when it is not initialised."""

from __future__ import annotations

import os


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def compute_device():
    """The ``torch.device`` this process computes on: its own GPU when CUDA is available, else the CPU.

    ``LOCAL_RANK`` (set by ``grads.launch`` and torchrun) picks the card, modulo the visible count, so
    each local rank of a multi-process job works on its own GPU, as DeepSpeed's engine does.
    """
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Callers pass ``base_seed + rank`` where ranks must differ."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
