"""DeepSpeed JSON templates (``conf/trainer/ds/*.json``) and the filling of their ``"auto"`` fields
from the trainer knobs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from grads.constants import conf_dir
from grads.training.settings import TrainerSettings


def load_ds_template(ref: str) -> dict:
    """Read a DeepSpeed JSON template: an existing path, or a path under ``conf/trainer/``."""
    path, trainer_dir = Path(ref), conf_dir() / "trainer"  # GRADS_CONF_DIR is honoured here too
    if not path.exists():
        path = trainer_dir / ref
    if not path.exists() and not ref.endswith(".json"):
        path = trainer_dir / "ds" / f"{ref}.json"
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {ref!r} not found (looked under {trainer_dir})")
    return json.loads(path.read_text())


def _fill(node: dict, key: str, value: Any, where: str) -> None:
    cur = node.get(key, "auto")
    if cur == "auto":
        node[key] = value
    elif cur != value:
        raise ValueError(
            f"DeepSpeed config {where}{key}={cur!r} contradicts the trainer knobs "
            f'({value!r}); set it to "auto" in the JSON'
        )


def fill_ds_config(template: dict, s: TrainerSettings, world_size: int, on_cuda: bool) -> dict:
    """Fill a template's ``"auto"`` fields (batch sizes, AdamW, clipping, bf16) from the knobs.

    Explicit values that contradict a knob raise, so the JSON can never silently disagree with the
    Hydra config. The learning-rate schedule is built by the trainer (``cosine_schedule``), not by
    DeepSpeed, because ``WarmupCosineLR`` spends its first two steps at lr 0 and rejects warmup 0.
    """
    ds = copy.deepcopy(template)
    if "scheduler" in ds:
        raise ValueError(
            "remove 'scheduler' from the DeepSpeed JSON: the trainer owns the schedule "
            "(trainer.warmup_ratio / min_lr_ratio)"
        )
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise ValueError("fp16 is not supported; use trainer.dtype=bf16")
    _fill(ds, "train_micro_batch_size_per_gpu", s.micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", s.grad_accum, "")
    _fill(ds, "train_batch_size", s.micro_batch_size * s.grad_accum * world_size, "")
    _fill(ds, "gradient_clipping", float(s.max_grad_norm), "")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    offload = ((zero.get("offload_optimizer") or {}).get("device") or "none") != "none"
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "AdamW")).lower() != "adamw":
        raise ValueError(f"optimizer.type={opt.get('type')!r}: the trainer and bench assume AdamW")
    params = opt.setdefault("params", {})
    _fill(params, "lr", float(s.lr), "optimizer.params.")
    _fill(params, "betas", list(s.betas), "optimizer.params.")
    _fill(params, "eps", float(s.eps), "optimizer.params.")
    _fill(params, "weight_decay", float(s.weight_decay), "optimizer.params.")
    # torch.optim.AdamW on CPU (FusedAdam is a CUDA/JIT op); DeepSpeedCPUAdam when offloading.
    _fill(params, "torch_adam", (not on_cuda) and not offload, "optimizer.params.")
    _fill(ds.setdefault("bf16", {}), "enabled", s.resolved_dtype() == "bf16", "bf16.")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ValueError(f"DeepSpeed config fields still 'auto' after filling: {leftover}")
    return ds


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node
