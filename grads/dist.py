"""Tiny helpers over torch.distributed that also work when it is not initialised."""

from __future__ import annotations

import os

TIMEOUT_ENV = "GRADS_DIST_TIMEOUT_S"  # collective timeout of every rank, in seconds
DEFAULT_TIMEOUT_S = 1800  # torch's own default for Gloo and NCCL


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


def init_process_group() -> None:
    """Join the process group a launcher set up (``env://``: ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), unless this process is in one already.

    NCCL on CUDA, with each local rank on its own card first; Gloo on the CPU. Collectives time out
    after ``GRADS_DIST_TIMEOUT_S`` seconds (default 1800), so a rank whose peer died without closing
    its connections fails instead of hanging.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    dist.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout
    )


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
