"""Multi-process launch without Hydra in the workers.

The driver composes the Hydra config once, resolves it to a plain dict, and starts ``procs`` workers
that each receive that dict. Workers never compose a config or create an output directory of their
own (cf. Hydra issue 2070). Rendezvous is over loopback; the backend is NCCL on CUDA, Gloo on CPU.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_callable(fn: str | Callable | None) -> Callable | None:
    """``fn`` itself, or the function a ``"module:function"`` spec names (``None`` stays ``None``)."""
    if fn is None or callable(fn):
        return fn
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(
    local_rank: int, fn: str, world_size: int, port: int, args: tuple, kwargs: dict
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, rank=local_rank, world_size=world_size)
    try:
        resolve_callable(fn)(*args, **kwargs)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(fn: str, procs: int, *args: Any, **kwargs: Any) -> None:
    """Run ``fn(*args, **kwargs)`` on ``procs`` local ranks (``"module:function"`` spec).

    With ``procs <= 1`` the function runs in this process with no process group. Arguments must be
    picklable (pass resolved config dicts, not DictConfig with interpolations).
    """
    if procs <= 1:
        resolve_callable(fn)(*args, **kwargs)
        return
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker,
        args=(fn, procs, free_port(), args, kwargs),
        nprocs=procs,
        join=True,
        start_method="spawn",
    )
