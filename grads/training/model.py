"""The trainable model: LoRA wrapping or full unfreezing, AdamW parameter groups, and loading a
trained run's model back.
"""

from __future__ import annotations

import os
from pathlib import Path

from grads.training.settings import ADAPTER_DIR, MODEL_DIR, TrainerSettings


def prepare_model(model, s: TrainerSettings):
    """Wrap with LoRA (``mode=lora``) or unfreeze everything (``full``); switch to train mode."""
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if s.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=int(s.lora.r),
            lora_alpha=int(s.lora.alpha),
            lora_dropout=float(s.lora.dropout),
            target_modules=list(s.lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norms (1-D tensors) and frozen weights."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def load_trained(model_cfg: dict, out_dir: str | os.PathLike, cache_dir: str | None = None):
    """Load the trained model of a ``run_train`` output folder as ``(model, tokenizer)``.

    Uses ``out_dir/model`` (full weights) when present, else base + ``out_dir/adapter`` merged.
    """
    from grads.models import load_model

    out = Path(out_dir)
    if (out / MODEL_DIR / "config.json").exists():
        return load_model(model_cfg, cache_dir=cache_dir, path=out / MODEL_DIR)
    if not (out / ADAPTER_DIR / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{out} has neither {MODEL_DIR}/ nor {ADAPTER_DIR}/: training incomplete?"
        )
    from peft import PeftModel

    base, tokenizer = load_model(model_cfg, cache_dir=cache_dir)
    model = PeftModel.from_pretrained(base, out / ADAPTER_DIR).merge_and_unload()
    model.eval()
    return model, tokenizer
