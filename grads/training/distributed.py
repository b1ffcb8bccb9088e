"""Distributed plumbing: the process group, DeepSpeed's import and engine, and a sum over ranks."""

from __future__ import annotations

import logging
import os

from grads.training.model import param_groups
from grads.training.schedule import make_scheduler, warmup_steps_for
from grads.training.settings import TrainerSettings


def ensure_dist() -> None:
    """Make sure a process group exists (DeepSpeed needs one even for a single process)."""
    import deepspeed
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized():
        from grads.launch import free_port

        for k, v in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(k, v)
        if os.environ.get("WORLD_SIZE", "1") == "1":
            # Single process: always a fresh port. A stale MASTER_PORT from an earlier job in this
            # process (Hydra multirun runs jobs sequentially) may still be bound.
            os.environ["MASTER_PORT"] = str(free_port())
        else:
            os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False
    )


def import_deepspeed():
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif os.environ.get("DS_ACCELERATOR") == "cpu":
        # DeepSpeed would put the engine on the CPU while the rest of the code (bf16, NCCL,
        # FusedAdam) assumes the GPU: fail here rather than train slowly or crash in a collective.
        raise RuntimeError(
            "DS_ACCELERATOR=cpu but CUDA is available: unset it (or set DS_ACCELERATOR=cuda); "
            "to train on the CPU of a GPU machine, hide the GPUs with CUDA_VISIBLE_DEVICES="
        )
    import deepspeed

    # DeepSpeed logs its whole config and every optimizer step at INFO.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def all_reduce_sum(value: float) -> float:
    import torch
    import torch.distributed as tdist

    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return value
    t = torch.tensor(
        [value],
        dtype=torch.float64,
        device="cuda" if torch.cuda.is_available() and tdist.get_backend() == "nccl" else "cpu",
    )
    tdist.all_reduce(t)
    return float(t.item())


def build_engine(model, s: TrainerSettings, ds_config: dict, total_steps: int, world_size: int):
    """``deepspeed.initialize`` with AdamW groups and the warm-up + cosine schedule.

    Shared with ``scripts/bench_train.py`` so the benchmark times exactly this engine.
    """
    deepspeed = import_deepspeed()
    warm = warmup_steps_for(s, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, s.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: make_scheduler(opt, total_steps, warm, s.min_lr_ratio),
    )
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage == 0 and world_size == 1:
        # A 1-rank all-reduce is an identity that still flattens and copies every gradient
        # (ZeRO >= 1 reduces through the same hook, so only stage 0 may skip it).
        engine.enable_backward_allreduce = False
    if stage == 0 and not ds_config["bf16"]["enabled"] and s.max_grad_norm > 0:
        import torch

        trainable = [p for p in engine.module.parameters() if p.requires_grad]

        def clip_trainable() -> None:
            # DeepSpeed's generic fp32 clip walks every (frozen) parameter and all-reduces the
            # norm on each step, ~4 ms/step on the tiny LoRA model; at stage 0 the gradients
            # are already reduced and identical on all ranks, so torch's clip over the trainable
            # tensors is the same maths. It also records the norm, which stage 0 otherwise drops.
            engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(trainable, s.max_grad_norm)

        engine.clip_fp32_gradients = clip_trainable
    return engine
