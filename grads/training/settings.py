"""The trainer knobs: ``conf/trainer/*.yaml`` (and the ``tuning`` group) with ``cfg[use]`` merged on
top, plus the names of a training run's output layout.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

MODEL_DIR, ADAPTER_DIR, CKPT_DIR = "model", "adapter", "checkpoints"
LOG_NAME, SUMMARY_NAME, DS_CONFIG_NAME = "train_log.jsonl", "train_summary.json", "ds_config.json"
WARMUP_IDS_NAME = "warmup_ids.json"
USES = ("warmup", "finetune")


@dataclasses.dataclass(kw_only=True)
class LoraSettings:
    """LoRA knobs (peft); ``target_modules: None`` takes ``model.lora_target_modules``.

    No defaults here: they live in ``conf/trainer/cpu.yaml`` only (``from_cfg`` merges them).
    """

    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | None


@dataclasses.dataclass(kw_only=True)
class TrainerSettings:
    """The trainer knobs (``conf/trainer/*.yaml`` with ``cfg[use]`` merged on top).

    Unknown keys are rejected in ``from_cfg`` so that a typo fails before a model is loaded. The
    fields are the schema; their defaults live in ``conf/trainer/cpu.yaml`` only.
    """

    name: str
    ds_config: str  # relative to conf/trainer/, or an absolute path
    procs: int | str  # processes per node; "auto": one per CUDA device (1 on CPU)
    mode: str  # lora | full
    lora: LoraSettings
    epochs: float
    max_steps: int  # > 0 overrides epochs
    micro_batch_size: int
    grad_accum: int
    lr: float
    warmup_ratio: float
    min_lr_ratio: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    max_grad_norm: float  # 0 disables clipping
    dtype: str  # auto | float32 | bf16
    autocast: bool  # forward under torch.autocast(bf16) with float32 weights (mixed precision)
    seed: int | None  # None: the top-level cfg.seed
    save_every: int  # optimizer steps between resumable checkpoints; 0: none
    keep_checkpoints: int
    clean_checkpoints: bool
    save_merged: bool  # LoRA: also export base+adapter merged (always on for warmup)
    log_every: int  # steps between log_fn calls; train_log.jsonl gets every step
    gradient_checkpointing: bool
    stop_after_steps: int | None  # debug: return after this step, as if killed
    group_by_length: bool  # batches of similar length (less padding), batch order shuffled
    length_group_size: int  # global batches per window sorted by length (HF's megabatch)
    # Warm-up only (set under `warmup:` in conf/config.yaml); the fine-tune trains on its whole list.
    fraction: float = 1.0  # train on this seeded random fraction of the pool
    max_samples: int | None = None  # and on at most this many samples
    # Nodes the trainer runs on (``dist.nnodes``, set by ``from_cfg``). Not a field: the world size
    # is keyed through the global batch, and one node keeps every existing key.
    nnodes: ClassVar[int] = 1

    @classmethod
    def from_cfg(cls, cfg: dict, use: str) -> TrainerSettings:
        """Settings from a resolved config: ``cfg["trainer"]`` deep-merged with ``cfg[use]``."""
        if use not in USES:
            raise ValueError(f"use={use!r}: expected one of {USES}")
        from grads.config_access import defaults  # conf/trainer/cpu.yaml: the one place they live

        trainer = _deep_merge(defaults("trainer"), dict(cfg.get("trainer") or {}))
        merged = _deep_merge(trainer, dict(cfg.get(use) or {}))
        merged = {k: v for k, v in merged.items() if not str(k).startswith("_")}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise ValueError(
                f"unknown trainer knob(s) {unknown} (trainer + {use}); known: {sorted(names)}"
            )
        lora = dict(merged.pop("lora", None) or {})
        lora_names = {f.name for f in dataclasses.fields(LoraSettings)}
        if set(lora) - lora_names:
            raise ValueError(f"unknown trainer.lora knob(s) {sorted(set(lora) - lora_names)}")
        s = cls(**merged, lora=LoraSettings(**lora))
        if s.lora.target_modules is None:
            s.lora.target_modules = list((cfg.get("model") or {}).get("lora_target_modules") or [])
        if s.seed is None:
            s.seed = int(cfg.get("seed", 0) or 0)
        if use == "warmup":
            # The features stage reads Embedding / LM-head gradients of a full model.
            s.save_merged = True
        elif s.fraction != 1.0 or s.max_samples is not None:
            raise ValueError(
                "fraction / max_samples subsample the warm-up's pool only (warmup.fraction, "
                "warmup.max_samples); the fine-tune trains on the selected ids"
            )
        s.betas = tuple(float(b) for b in s.betas)
        from grads.launch import nnodes_of

        s.nnodes = nnodes_of(cfg)
        s.validate()
        return s

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent knobs."""
        if self.mode not in ("lora", "full"):
            raise ValueError(f"trainer.mode={self.mode!r}: expected lora or full")
        if self.mode == "lora" and not self.lora.target_modules:
            raise ValueError(
                "trainer.mode=lora needs lora.target_modules (or model.lora_target_modules)"
            )
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch_size and grad_accum must be >= 1")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.dtype not in ("auto", "float32", "fp32", "bf16", "bfloat16"):
            raise ValueError(f"trainer.dtype={self.dtype!r}: expected auto, float32 or bf16")
        if self.save_every < 0 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError(
                "save_every >= 0, keep_checkpoints >= 1 and log_every >= 1 are required"
            )
        if self.length_group_size < 1:
            raise ValueError(f"length_group_size={self.length_group_size} must be >= 1")
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ValueError(f"warmup.fraction={self.fraction} must be in (0, 1]")
        if self.max_samples is not None and int(self.max_samples) < 1:
            raise ValueError(f"warmup.max_samples={self.max_samples} must be >= 1 or null")

    def resolved_dtype(self) -> str:
        """``float32`` or ``bf16``; ``auto`` is bf16 on CUDA and float32 elsewhere."""
        if self.dtype == "auto":
            return "bf16" if _cuda_available() else "float32"
        return "bf16" if self.dtype in ("bf16", "bfloat16") else "float32"

    def autocast_dtype(self):
        """``torch.bfloat16`` when the forward runs under autocast, else ``None``.

        Only float32 weights are autocast: with ``dtype=bf16`` the weights already compute in bf16.
        """
        if not (self.autocast and self.resolved_dtype() == "float32"):
            return None
        import torch

        return torch.bfloat16

    def resolved_procs(self) -> int:
        """Processes the trainer runs on: ``procs`` per node ("auto": one per CUDA device, 1 on
        the CPU) times ``dist.nnodes``."""
        if self.procs == "auto":
            if not _cuda_available():
                return self.nnodes
            import torch

            return max(1, torch.cuda.device_count()) * self.nnodes
        return int(self.procs) * self.nnodes


def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch on a Linux machine that has no GPU
    driver device (no ``/dev/nvidia*``, ``/dev/kfd`` or ``/dev/dxg``): there torch would say False,
    and a fully cached rerun, whose stage keys ask this, then never loads torch (seconds)."""
    import sys

    if "torch" not in sys.modules and sys.platform.startswith("linux"):
        import glob

        if (
            not glob.glob("/dev/nvidia*")
            and not glob.glob("/dev/kfd")
            and not glob.glob("/dev/dxg")
        ):
            return False
    import torch

    return torch.cuda.is_available()


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out
