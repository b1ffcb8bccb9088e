"""The trainer's identity: the knobs of a :class:`~grads.training.settings.TrainerSettings`
that decide the trained weights, shared by the training stages' cache keys
(:func:`grads.identity.train_identity`) and the trainer's resume fingerprint, so the two cannot
disagree about which knobs matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

from grads.hashing import NON_SEMANTIC, digest, without


def trainer_identity(s: Any, world_size: int) -> dict:
    """The knobs of a :class:`grads.training.TrainerSettings` that decide the trained weights.

    Shared by the stage key and the trainer's resume fingerprint. The trainer normalises each step
    by the supervised tokens of the global batch, so only ``micro_batch_size x grad_accum x procs``
    matters, not how it is split, except with LoRA dropout: its masks are drawn per rank and per
    micro-batch, so the split changes the weights (measured: see ``tests/test_identity.py``).
    """
    knobs = dataclasses.asdict(s)
    ident = without(knobs, NON_SEMANTIC["trainer"] | {"ds_config", "dtype", "autocast"})
    ident["dtype"] = s.resolved_dtype()
    if s.autocast_dtype() is not None:  # keyed only when it acts: keys from before the knob stay
        ident["autocast"] = "bf16"
    ident["global_batch"] = s.micro_batch_size * s.grad_accum * int(world_size)
    if s.mode == "lora" and float(s.lora.dropout) > 0:
        ident["layout"] = {
            "micro_batch_size": s.micro_batch_size,
            "grad_accum": s.grad_accum,
            "world_size": int(world_size),
        }
    from grads.training.ds_config import load_ds_template

    ident["ds_config"] = digest(load_ds_template(s.ds_config))
    return ident


def resume_fingerprint(
    s: Any, use: str, model_cfg: Mapping, ids: list[str], world_size: int
) -> str:
    """The trainer's checkpoint fingerprint: :func:`trainer_identity` + model config + sample ids."""
    return digest(
        {
            "use": use,
            "trainer": trainer_identity(s, world_size),
            "model": without(model_cfg, ()),
            "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        }
    )
