"""DeepSpeed-backed SFT trainer, used twice by GrADS (arXiv 2511.08620).

* ``warmup``: the paper's preliminary epoch over the whole domain pool. Its model feeds the
  gradient-features stage, which reads Embedding and LM-head gradients, so the warm-up always
  exports a full (LoRA-merged) Hugging Face model.
* ``finetune``: from the base model again, on the ids chosen by a selector.

One implementation serves both: ``run_train(cfg, use, out_dir, ids, pool)`` merges ``cfg[use]``
(``epochs``/``max_steps``, or any other trainer knob) over ``cfg["trainer"]``. Every run goes
through ``deepspeed.initialize`` (CPU with ``DS_ACCELERATOR=cpu``, CUDA otherwise); the JSON files
under ``conf/trainer/ds/`` are templates whose ``"auto"`` fields are filled from the trainer knobs.

Loss normalisation: each optimizer step's loss is the mean over *all* supervised tokens of the
global batch (sum of token losses / supervised tokens in the global batch), not a mean of per-micro-
batch means. This makes the update independent of how the global batch is split into micro-batches
and ranks, which is what lets 2 processes reproduce the 1-process loss curve.

Output layout of ``out_dir``::

    model/               full HF model (safetensors) + tokenizer. Always for full fine-tuning and
                         for the warm-up; for LoRA fine-tunes only with ``save_merged: true``.
                         Load with ``grads.models.load_model(cfg.model, path=out_dir / "model")``.
    adapter/             PEFT LoRA adapter + tokenizer (``mode: lora`` only).
    checkpoints/         resumable state: ``step_XXXXXXXX/`` folders and a ``latest`` pointer
                         (deleted at the end unless ``trainer.clean_checkpoints: false``).
    train_log.jsonl      one row per optimizer step: step, epoch, loss, lr, tokens, padded_tokens,
                         padding_efficiency (real / padded tokens), tokens/s, time, grad_norm.
    train_summary.json   written last; its presence marks a completed run. Keys include steps,
                         tokens, wall_time_s (training loop, summed over resumed segments),
                         run_time_s (this invocation incl. load/export), loop_cpu_s (process CPU
                         time of this segment's loop), first_loss, final_loss, padding_efficiency,
                         model_dir / adapter_dir ("model" / "adapter" or null: relative to the
                         run folder, so a pipeline may rename it), resumed_from_step, fingerprint.
    ds_config.json       the filled DeepSpeed config, for provenance.
    warmup_ids.json      warm-up on a subset (``warmup.fraction`` / ``warmup.max_samples``): the
                         seeded subset's ids and knobs (see ``warmup_subset``).
    features.parquet     warm-up with ``features.source: warmup``: the features table recorded from
    features.json        the warm-up's own steps (``_Recording``), same schema as the features stage.

Batches: with ``group_by_length`` (default) each global batch holds samples of similar length
(``length_grouped_batches``), in shuffled order, so micro-batches pad little; the plan depends on
the seed and the global batch only, so resume and the 1-vs-N-process equivalence are unchanged.

The features stage should load ``out_dir/model`` (``train_summary.json["model_dir"]``, relative to
``out_dir``) with ``load_model(cfg.model, path=out_dir / "model")``: a plain Hugging Face model with
the LoRA update merged in, so Embedding / LM-head gradients need no peft. ``load_trained(cfg.model,
out_dir)`` does the same and falls back to base + adapter for LoRA fine-tunes without a merged copy.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
IGNORE_INDEX = -100
MODEL_DIR, ADAPTER_DIR, CKPT_DIR = "model", "adapter", "checkpoints"
LOG_NAME, SUMMARY_NAME, DS_CONFIG_NAME = "train_log.jsonl", "train_summary.json", "ds_config.json"
WARMUP_IDS_NAME = "warmup_ids.json"
USES = ("warmup", "finetune")


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoraSettings:
    """LoRA knobs (peft); ``target_modules: None`` takes ``model.lora_target_modules``."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None


@dataclasses.dataclass
class TrainerSettings:
    """The trainer knobs (``conf/trainer/*.yaml`` with ``cfg[use]`` merged on top).

    Unknown keys are rejected in ``from_cfg`` so that a typo fails before a model is loaded.
    """

    name: str = "cpu"
    ds_config: str = "ds/cpu.json"  # relative to conf/trainer/, or an absolute path
    procs: int | str = 1  # local processes; "auto": one per CUDA device (1 on CPU)
    mode: str = "lora"  # lora | full
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    dtype: str = "auto"  # auto | float32 | bf16
    seed: int | None = None  # None: the top-level cfg.seed
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: none
    keep_checkpoints: int = 1
    clean_checkpoints: bool = True
    save_merged: bool = False  # LoRA: also export base+adapter merged (always on for warmup)
    log_every: int = 1  # steps between log_fn calls; train_log.jsonl gets every step
    gradient_checkpointing: bool = False
    stop_after_steps: int | None = None  # debug: return after this step, as if killed
    group_by_length: bool = True  # batches of similar length (less padding), batch order shuffled
    length_group_size: int = 50  # global batches per window sorted by length (HF's megabatch)
    fraction: float = 1.0  # warm-up only: train on this seeded random fraction of the pool
    max_samples: int | None = None  # warm-up only: and on at most this many samples

    @classmethod
    def from_cfg(cls, cfg: dict, use: str) -> TrainerSettings:
        """Settings from a resolved config: ``cfg["trainer"]`` deep-merged with ``cfg[use]``."""
        if use not in USES:
            raise ValueError(f"use={use!r}: expected one of {USES}")
        merged = _deep_merge(dict(cfg.get("trainer") or {}), dict(cfg.get(use) or {}))
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
        import torch

        if self.dtype == "auto":
            return "bf16" if torch.cuda.is_available() else "float32"
        return "bf16" if self.dtype in ("bf16", "bfloat16") else "float32"

    def resolved_procs(self) -> int:
        import torch

        if self.procs == "auto":
            return max(1, torch.cuda.device_count())
        return int(self.procs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _plain(cfg: Any) -> dict:
    """A resolved plain dict from a DictConfig or a dict (workers never see interpolations)."""
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


# --------------------------------------------------------------------------------------------------
# DeepSpeed config template
# --------------------------------------------------------------------------------------------------
def load_ds_template(ref: str) -> dict:
    """Read a DeepSpeed JSON template: an existing path, or a path under ``conf/trainer/``."""
    path = Path(ref)
    if not path.exists():
        path = CONF_DIR / "trainer" / ref
    if not path.exists() and not ref.endswith(".json"):
        path = CONF_DIR / "trainer" / "ds" / f"{ref}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"DeepSpeed config {ref!r} not found (looked under {CONF_DIR / 'trainer'})"
        )
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


# --------------------------------------------------------------------------------------------------
# Schedule, data order, loss
# --------------------------------------------------------------------------------------------------
def cosine_schedule(
    total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """Linear warm-up then cosine decay, as an lr multiplier of the number of *completed* steps.

    Optimizer step ``s`` (1-based) uses ``s / warmup_steps`` while ``s <= warmup_steps``, then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with ``p = (s - warmup - 1) /
    (total - warmup)``: no step runs at lr 0, and the first decay step runs at the peak lr.
    """

    def ratio(done: int) -> float:
        s = done + 1
        if s <= warmup_steps:
            return s / warmup_steps
        p = min(1.0, (s - warmup_steps - 1) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    return ratio


def warmup_steps_for(s: TrainerSettings, total_steps: int) -> int:
    return math.ceil(s.warmup_ratio * total_steps)


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """A ``LambdaLR`` over ``cosine_schedule`` (shared by the trainer and the bench's loop)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, cosine_schedule(total_steps, warmup_steps, min_ratio))


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Order of ``n`` samples in ``epoch``: a function of (seed, epoch) only, equal on all ranks."""
    import numpy as np

    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).tolist()


def length_grouped_batches(
    perm: Sequence[int], lengths: Sequence[int], global_batch: int, window: int, rng_seed: list[int]
) -> list[list[int]]:
    """Global batches of similar length from one epoch's permutation (HF's ``group_by_length``).

    The permutation is cut into windows of ``window`` global batches; each window is sorted by
    length (longest first; the sort is stable, so ties keep the random order) and cut into
    batches; then the order of all batches is shuffled with ``rng_seed``. Every sample appears
    once; only the last window's last batch can be partial. Deterministic in its arguments.
    """
    import numpy as np

    size = max(1, int(window)) * global_batch
    batches: list[list[int]] = []
    for s in range(0, len(perm), size):
        chunk = sorted(perm[s : s + size], key=lambda i: -lengths[i])
        batches += [chunk[k : k + global_batch] for k in range(0, len(chunk), global_batch)]
    order = np.random.default_rng(rng_seed).permutation(len(batches))
    return [batches[j] for j in order]


@dataclasses.dataclass
class BatchPlan:
    """Deterministic assignment of samples to optimizer steps, micro-steps and ranks.

    Each epoch's samples are cut into global batches of ``global_batch``: consecutive slices of
    the epoch permutation, or, given ``lengths``, ``length_grouped_batches`` of it (batches of
    similar length in shuffled order, so less padding). Step ``t`` takes batch ``t %
    steps_per_epoch`` of epoch ``t // steps_per_epoch``; slot ``j = micro * world_size + rank`` of
    that batch is a contiguous chunk of ``micro_batch_size`` samples. The batches depend only on
    the seed, the lengths and the global batch, so any (procs, micro_batch_size, grad_accum) split
    with the same product trains on the same batches. One batch per epoch may be partial (no
    sample is dropped); slots left empty run a dummy forward with zero loss so collectives stay
    aligned across ranks.
    """

    n: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    lengths: Sequence[int] | None = None
    length_group_size: int = 50
    _batches: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n / self.global_batch))

    def total_steps(self, epochs: float, max_steps: int) -> int:
        if max_steps and max_steps > 0:
            return int(max_steps)
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``, in step order."""
        if epoch not in self._batches:
            self._batches.clear()  # one epoch at a time: the order is recomputed cheaply on demand
            perm = epoch_permutation(self.n, self.seed, epoch)
            gb = self.global_batch
            if self.lengths is None:
                self._batches[epoch] = [perm[k : k + gb] for k in range(0, self.n, gb)]
            else:
                self._batches[epoch] = length_grouped_batches(
                    perm, self.lengths, gb, self.length_group_size, [int(self.seed), epoch, 1]
                )
        return self._batches[epoch]

    def step_batch(self, step: int) -> list[int]:
        """Positions (into the selected rows) of the global batch of optimizer step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_batches(epoch)[k]

    def micro_batches(self, batch: Sequence[int], rank: int) -> list[list[int]]:
        mb, w = self.micro_batch_size, self.world_size
        return [
            list(batch[(m * w + rank) * mb : (m * w + rank + 1) * mb])
            for m in range(self.grad_accum)
        ]

    def padded_tokens(self, batch: Sequence[int], n_tok: Sequence[int]) -> int:
        """Tokens the global batch's micro-batches occupy once padded to their longest member."""
        mb = self.micro_batch_size
        slots = (batch[j : j + mb] for j in range(0, len(batch), mb))
        return sum(len(c) * max(n_tok[i] for i in c) for c in slots)

    def last_visits(self, total_steps: int) -> dict[int, int]:
        """Position -> the last step (< ``total_steps``) whose batch contains it."""
        last: dict[int, int] = {}
        for step in range(total_steps):
            for i in self.step_batch(step):
                last[i] = step
        return last


def _collate_fn() -> Callable:
    from grads.data import collate

    return collate


def token_loss_sum(model, batch: dict):
    """Summed next-token cross-entropy over supervised tokens (labels != -100), in float32.

    Returns the sum, not the mean: the caller divides by the global batch's supervised-token count.
    """
    import torch.nn.functional as F

    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def supervised_count(labels: Sequence[int]) -> int:
    """Supervised targets of one sample: labels after the first (shifted out) that are not -100."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpoints:
    """Atomic resumable checkpoints under ``root``.

    A checkpoint is written into ``root/.tmp-step_N`` by all ranks (DeepSpeed model/optimizer/
    scheduler state plus one RNG file per rank), completed by rank 0 with ``meta.json``, renamed to
    ``root/step_N`` (one ``os.replace``) and only then published by rewriting ``root/latest``
    atomically. A kill at any point leaves either the previous ``latest`` or the new one, never a
    pointer to a half-written folder; stale ``.tmp-*`` folders are ignored and deleted on start.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def clean_stale(self) -> None:
        for p in self.root.glob(".tmp-*"):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "meta.json").exists():
            raise RuntimeError(
                f"{pointer} names {path.name}, which is incomplete: refusing to resume"
            )
        return path

    def save(
        self,
        engine,
        step: int,
        meta: dict,
        exclude_frozen: bool,
        rank: int,
        keep: int = 1,
        extra: dict | None = None,
    ) -> Path:
        """Write ``step_N`` (a collective); ``extra`` (rank 0's, picklable) goes to ``extra.pt``."""
        import torch

        from grads.dist import barrier
        from grads.io import write_json, write_text

        tag = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{tag}", self.root / tag
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(
            str(tmp),
            tag="state",
            client_state={"step": step},
            save_latest=False,
            exclude_frozen_parameters=exclude_frozen,
        )
        torch.save(_rng_state(), tmp / f"rng_rank{rank:04d}.pt")
        barrier()
        if rank == 0:
            if extra is not None:
                torch.save(extra, tmp / "extra.pt")
            write_json(tmp / "meta.json", {**meta, "step": step})
            if final.exists():  # a completed-but-unpublished copy from a killed run
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text(self.root / "latest", tag + "\n")
            self._prune(keep)
        barrier()
        return final

    def _prune(self, keep: int) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        current = (self.root / "latest").read_text().strip()
        for p in done[:-keep]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def extra(path: Path) -> dict:
        """The ``extra`` dict saved with checkpoint ``path`` (empty if none)."""
        import torch

        f = Path(path) / "extra.pt"
        return torch.load(f, weights_only=False) if f.exists() else {}

    def load(self, engine, path: Path, exclude_frozen: bool, rank: int) -> dict:
        """Restore engine state and this rank's RNG; returns ``meta.json``."""
        import torch

        from grads.io import read_json

        meta = read_json(path / "meta.json")
        load_path, _ = engine.load_checkpoint(
            str(path), tag="state", load_module_strict=not exclude_frozen
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        rng = path / f"rng_rank{rank:04d}.pt"
        if rng.exists():
            # Our own file (python/numpy RNG tuples are not plain tensors).
            _set_rng_state(torch.load(rng, weights_only=False))
        else:
            log.warning(
                "no RNG state for rank %d in %s (world size changed?): reseeding", rank, path
            )
            from grads.dist import seed_everything

            seed_everything(int(meta["seed"]) + rank + int(meta["step"]))
        return meta


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------
def _ensure_dist() -> None:
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


def _import_deepspeed():
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed logs its whole config and every optimizer step at INFO.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _all_reduce_sum(value: float) -> float:
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


def _resolve_fn(fn: Callable | str | None) -> Callable | None:
    if fn is None or callable(fn):
        return fn
    import importlib

    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


def build_engine(model, s: TrainerSettings, ds_config: dict, total_steps: int, world_size: int):
    """``deepspeed.initialize`` with AdamW groups and the warm-up + cosine schedule.

    Shared with ``scripts/bench_train.py`` so the benchmark times exactly this engine.
    """
    deepspeed = _import_deepspeed()
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


# --------------------------------------------------------------------------------------------------
# Data selection
# --------------------------------------------------------------------------------------------------
def _pool_ids(pool) -> list[str]:
    all_ids = pool["id"] if hasattr(pool, "column_names") else [r["id"] for r in pool]
    return [str(x) for x in all_ids]


def warmup_subset(
    pool_ids: Sequence[str], fraction: float, max_samples: int | None, seed: int
) -> list[str] | None:
    """The warm-up's seeded random subset of the pool (``warmup.fraction`` / ``max_samples``).

    Keeps ``k = min(ceil(fraction * n), max_samples)`` ids (at least one): the first ``k`` of a
    permutation drawn from ``(seed, 15)``, returned in pool order, so the subset is a function of
    the pool, the knobs and the seed only. ``None`` when ``k`` covers the whole pool (LESS warms
    up on 5% of its pool; the GrADS paper on all of it).
    """
    import numpy as np

    n = len(pool_ids)
    k = max(1, math.ceil(float(fraction) * n))
    if max_samples is not None:
        k = min(k, int(max_samples))
    if k >= n:
        return None
    keep = np.sort(np.random.default_rng([int(seed), 15]).permutation(n)[:k])
    return [pool_ids[i] for i in keep.tolist()]


def _write_subset(out: Path, s: TrainerSettings, row_ids: list[str], n_pool: int) -> dict:
    """Record the warm-up's subset (``warmup_ids.json``); return its summary entry."""
    from grads.io import write_json

    info = {
        "fraction": float(s.fraction),
        "max_samples": s.max_samples,
        "seed": s.seed,
        "n_pool": n_pool,
        "n": len(row_ids),
        "ids_file": WARMUP_IDS_NAME,
    }
    write_json(out / WARMUP_IDS_NAME, {**info, "ids": list(row_ids)})
    return info


def _features_source(cfg: dict) -> str:
    from grads.features import features_source

    return features_source(cfg)


class _Recording:
    """``features.source: warmup``: the warm-up writes the features table itself.

    Each trained sample's gradient norms are read at its *last* visit (so with one epoch, its only
    one), from that micro-batch's own forward and backward (``grads.gradients.GradNormRecorder``),
    before the optimizer step. Rows survive a restart in the checkpoints' ``extra.pt`` and are
    gathered on rank 0, which writes ``features.parquet`` / ``features.json`` next to the model.
    """

    def __init__(self, module, cfg: dict, plan: BatchPlan, total: int, row_ids: list[str]):
        from grads.gradients import GradNormRecorder

        chunk = int(((cfg.get("features") or {}).get("chunk_bytes")) or (1 << 26))
        # Statistics always: they are cheap here, and the cached warm-up serves either setting.
        self.rec = GradNormRecorder(module, stats=True, chunk_bytes=chunk)
        self.last = plan.last_visits(total)
        self.row_ids = row_ids
        self.rows: dict[str, dict] = {}
        self.time_s = 0.0

    def wanted(self, micro: Sequence[int], step: int) -> list[int]:
        """Slots of ``micro`` whose sample is visited for the last time at ``step``."""
        return [k for k, i in enumerate(micro) if self.last.get(i) == step]

    def arm(self) -> None:
        self.rec.arm()

    def collect(self, batch: dict, scale: float, micro: Sequence[int], want: list[int]) -> None:
        t0 = time.perf_counter()
        cols = {k: v.tolist() for k, v in self.rec.collect(batch, scale).items()}
        for k in want:
            sid = self.row_ids[micro[k]]
            self.rows[sid] = {"id": sid, **{c: v[k] for c, v in cols.items()}}
        self.time_s += time.perf_counter() - t0

    def gather(self) -> dict[str, dict] | None:
        """Every rank's rows, on rank 0 (``None`` on the others). A collective."""
        import torch.distributed as tdist

        if not (tdist.is_initialized() and tdist.get_world_size() > 1):
            return dict(self.rows)
        parts = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
        tdist.gather_object(self.rows, parts, dst=0)
        if parts is None:
            return None
        return {k: v for part in parts for k, v in part.items()}

    def write(self, out: Path, recorded: dict[str, dict], pool_ids: list[str]) -> dict:
        """Rank 0: the table in pool order (recorded ids only); returns ``features.json``."""
        from grads.features import write_recorded

        rows = [recorded[i] for i in pool_ids if i in recorded]
        return write_recorded(
            out,
            rows,
            tied=self.rec.tied,
            pool_size=len(pool_ids),
            extra={
                "record_time_s_rank0": self.time_s,
            },
        )

    def close(self) -> None:
        self.rec.close()


def _select_rows(pool, ids: Sequence[str] | None) -> list[int]:
    """Row positions of ``ids`` in ``pool`` (all rows when ``ids`` is None), in pool order."""
    all_ids = pool["id"] if hasattr(pool, "column_names") else [r["id"] for r in pool]
    if ids is None:
        return list(range(len(all_ids)))
    wanted = {str(i) for i in ids}
    rows = [i for i, x in enumerate(all_ids) if str(x) in wanted]
    found = {str(all_ids[i]) for i in rows}
    if len(found) != len(wanted):
        missing = sorted(wanted - found)
        raise KeyError(f"{len(missing)} selected id(s) are not in the pool, e.g. {missing[:5]}")
    if len(rows) != len(found):
        raise ValueError("the pool has duplicate ids; ids must be unique")
    return rows


def _row_stats(pool, rows: list[int]) -> tuple[list[str], list[int], list[int]]:
    """Ids, token counts and supervised-token counts of the selected rows, in one pass."""
    if hasattr(pool, "select") and hasattr(pool, "iter"):  # datasets.Dataset: read in batches
        ids, n_tok, n_sup = [], [], []
        sub = pool.select(rows).select_columns(["id", "input_ids", "labels"])
        for b in sub.iter(batch_size=1024):
            ids += [str(x) for x in b["id"]]
            n_tok += [len(x) for x in b["input_ids"]]
            n_sup += [supervised_count(x) for x in b["labels"]]
        return ids, n_tok, n_sup
    picked = [pool[i] for i in rows]
    return (
        [str(r["id"]) for r in picked],
        [len(r["input_ids"]) for r in picked],
        [supervised_count(r["labels"]) for r in picked],
    )


def _fingerprint(
    s: TrainerSettings, use: str, model_cfg: dict, ids: list[str], global_batch: int
) -> str:
    # Knobs that do not change the trajectory (how it is split, logged or saved) stay out, so a
    # restart may change procs/micro_batch_size as long as the global batch is the same (ZeRO-0/1
    # checkpoints load across world sizes; ZeRO-2/3 optimizer shards need the same world size).
    skip = {
        "procs",
        "micro_batch_size",
        "grad_accum",
        "save_every",
        "keep_checkpoints",
        "clean_checkpoints",
        "save_merged",
        "log_every",
        "stop_after_steps",
        "name",
        "ds_config",
    }
    knobs = {k: v for k, v in dataclasses.asdict(s).items() if k not in skip}
    blob = json.dumps(
        {
            "use": use,
            "knobs": knobs,
            "model": model_cfg,
            "global_batch": global_batch,
            "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def run_train(
    cfg: Any,
    use: str,
    out_dir: str | os.PathLike,
    ids: Sequence[str] | None = None,
    pool=None,
    log_fn: Callable[[dict, int], Any] | str | None = None,
) -> dict:
    """Train on this rank (call on every rank, or once for a single process) and export the model.

    Args:
        cfg: fully resolved config (dict or DictConfig) with ``model``, ``trainer``, ``warmup``,
            ``finetune``, ``paths``, ``seed`` (and ``data`` when ``pool`` is None). For the
            warm-up, ``features.source: warmup`` also records the features table (see
            ``_Recording``) and ``warmup.fraction`` / ``warmup.max_samples`` subsample the pool.
        use: ``warmup`` (whole pool, exports a merged full model) or ``finetune``.
        out_dir: output folder (see the module docstring for its layout). Rerunning the same
            command resumes from ``checkpoints/latest``; a completed run returns its summary.
        ids: sample ids to train on (``None``: the whole pool, or the warm-up's subset of it).
        pool: rows with ``id``, ``input_ids``, ``labels`` (list of dicts or ``datasets.Dataset``);
            ``None`` loads ``grads.data.load_pool(cfg, tokenizer)``.
        log_fn: ``log_fn(row, step)`` called on rank 0 every ``log_every`` steps (e.g. W&B), or a
            ``"module:function"`` spec.

    Returns:
        The training summary (also written to ``train_summary.json``), on every rank.
    """
    import torch

    from grads import dist
    from grads.io import read_json, read_jsonl, write_json, write_jsonl
    from grads.models import load_model

    cfg = _plain(cfg)
    s = TrainerSettings.from_cfg(cfg, use)
    record = use == "warmup" and _features_source(cfg) == "warmup"  # validates before loading
    out = Path(out_dir)
    _import_deepspeed()
    _ensure_dist()
    rank, world = dist.rank(), dist.world_size()
    on_cuda = torch.cuda.is_available()
    if not on_cuda and world > 1:
        # N CPU ranks x torch's default thread count oversubscribe the cores, and spinning
        # OpenMP threads then slow every rank down by far more than the split gains.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    log_fn = _resolve_fn(log_fn)
    t_start = time.perf_counter()

    # Base model: LoRA initialisation must be identical on all ranks (and in the 1-process run),
    # so seed with the base seed here; per-rank seeds come after, for dropout.
    dist.seed_everything(s.seed)
    model_cfg = {
        **dict(cfg["model"]),
        "dtype": "bfloat16" if s.resolved_dtype() == "bf16" else "float32",
    }
    cache_dir = (cfg.get("paths") or {}).get("model_dir")
    model, tokenizer = load_model(model_cfg, cache_dir=cache_dir)
    if pool is None:
        from grads.data import load_pool

        pool = load_pool(cfg, tokenizer)
    subset = None
    if use == "warmup" and ids is None:
        subset = warmup_subset(_pool_ids(pool), s.fraction, s.max_samples, s.seed)
        ids = subset
    rows = _select_rows(pool, ids)
    if not rows:
        raise ValueError("no samples to train on")
    row_ids, n_tok, n_sup = _row_stats(pool, rows)

    plan = BatchPlan(
        len(rows),
        s.micro_batch_size,
        s.grad_accum,
        world,
        s.seed,
        lengths=n_tok if s.group_by_length else None,
        length_group_size=s.length_group_size,
    )
    total = plan.total_steps(s.epochs, s.max_steps)
    fingerprint = _fingerprint(s, use, dict(cfg["model"]), sorted(row_ids), plan.global_batch)

    if (out / SUMMARY_NAME).exists():
        done = read_json(out / SUMMARY_NAME)
        if done.get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"{out} holds a finished run with a different config/data "
                f"({done.get('fingerprint')} != {fingerprint}); use a new out_dir"
            )
        log.info("%s already trained in %s: skipping", use, out)
        return done

    model = prepare_model(model, s)
    template = load_ds_template(s.ds_config)
    ds_config = fill_ds_config(template, s, world, on_cuda)
    engine = build_engine(model, s, ds_config, total, world)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    lora = s.mode == "lora"
    recording = _Recording(engine.module, cfg, plan, total, row_ids) if record else None

    # Resume.
    ckpts = Checkpoints(out / CKPT_DIR)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpts.clean_stale()
        write_json(out / DS_CONFIG_NAME, ds_config)
    dist.barrier()
    start, elapsed_before, tokens_before, resumed_from, first_loss = 0, 0.0, 0, None, None
    latest = ckpts.latest()
    if latest is not None:
        meta = ckpts.load(engine, latest, exclude_frozen=lora, rank=rank)
        if meta["fingerprint"] != fingerprint:
            raise RuntimeError(
                f"checkpoint {latest} was written by a different config/data "
                f"({meta['fingerprint']} != {fingerprint}); use a new out_dir"
            )
        start, resumed_from = int(meta["step"]), int(meta["step"])
        elapsed_before, tokens_before = float(meta["elapsed_s"]), int(meta["tokens"])
        if recording is not None and rank == 0:
            recording.rows.update(ckpts.extra(latest).get("recorded") or {})
        log.info("resuming %s from %s (step %d/%d)", use, latest.name, start, total)
    else:
        dist.seed_everything(s.seed + rank)
    if rank == 0:
        # Rows past the checkpoint were logged by the killed run and are about to be redone.
        old = read_jsonl(out / LOG_NAME) if (out / LOG_NAME).exists() else []
        kept = [r for r in old if int(r.get("step", 0)) <= start]
        write_jsonl(out / LOG_NAME, kept)
        first_loss = kept[0]["loss"] if kept else None
    dist.barrier()

    loop = _Loop(engine, s, plan, pool, rows, n_tok, n_sup, tokenizer, recording)
    resume = {"start": start, "elapsed_s": elapsed_before, "tokens": tokens_before}
    ran = _train_loop(loop, use, out, ckpts, fingerprint, total, log_fn, resume, first_loss)
    elapsed = elapsed_before + ran["seg_time"]
    tokens_seen = tokens_before + ran["tokens"]
    if ran["stopped"]:
        return {
            "use": use,
            "stopped": True,
            "steps": ran["done"],
            "total_steps": total,
            "final_loss": ran["loss"],
        }

    recorded = recording.gather() if recording is not None else None
    if recorded is not None and len(recorded) == len(pool) and lora:
        # Every pool sample is scored already: no features pass will load a merged model.
        s.save_merged = False
    # Export: gather the full state dict (collective under ZeRO-3), then rank 0 writes.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    summary = None
    if rank == 0:
        if state is None:
            state = engine.module.state_dict()
        paths = _export(engine.module, state, tokenizer, s, model_cfg, cache_dir, out)
        summary = {
            "use": use,
            "mode": s.mode,
            "completed": True,
            "fingerprint": fingerprint,
            "steps": total,
            "epochs": total / plan.steps_per_epoch,
            "num_samples": len(rows),
            "global_batch": plan.global_batch,
            "world_size": world,
            "zero_stage": zero_stage,
            "dtype": s.resolved_dtype(),
            "tokens": tokens_seen,
            "supervised_tokens_per_epoch": sum(n_sup),
            "wall_time_s": elapsed,
            "run_time_s": time.perf_counter() - t_start,
            "tokens_per_s": ran["tokens"] / max(1e-9, ran["seg_time"]),
            "loop_cpu_s": ran["cpu_s"],  # this segment, this rank's process
            "padding_efficiency": ran["tokens"] / max(1, ran["padded"]),
            "first_loss": ran["first_loss"],
            "final_loss": ran["loss"],
            "resumed_from_step": resumed_from,
            "seed": s.seed,
            **paths,
        }
        if subset is not None:
            summary["subset"] = _write_subset(out, s, row_ids, len(pool))
        if recorded is not None:
            summary["features"] = recording.write(out, recorded, _pool_ids(pool))
        write_json(out / SUMMARY_NAME, summary)
        if s.clean_checkpoints:
            shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
    dist.barrier()
    if recording is not None:
        recording.close()
    if summary is None:
        summary = read_json(out / SUMMARY_NAME)
    return summary


class _Loop:
    """What one optimizer step needs: the engine, the plan, the data and the optional recorder."""

    def __init__(self, engine, s, plan, pool, rows, n_tok, n_sup, tokenizer, recording):
        from grads import dist

        self.engine, self.s, self.plan, self.pool, self.rows = engine, s, plan, pool, rows
        self.n_tok, self.n_sup, self.recording = n_tok, n_sup, recording
        self.rank, self.world = dist.rank(), dist.world_size()
        self.collate = _collate_fn()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.dummy = {"input_ids": [self.pad_id], "labels": [IGNORE_INDEX]}

    def step(self, step: int) -> dict:
        """Run optimizer step ``step`` (0-based) on this rank; return its training-log row."""
        import torch

        engine, plan, rec = self.engine, self.plan, self.recording
        t0 = time.perf_counter()
        batch = plan.step_batch(step)
        n_sup_global = sum(self.n_sup[i] for i in batch)
        n_tok_global = sum(self.n_tok[i] for i in batch)
        padded = plan.padded_tokens(batch, self.n_tok)
        # DeepSpeed averages gradients over ranks: multiply by the world size so the update is
        # sum(token losses) / supervised tokens of the global batch.
        scale = self.world / max(1, n_sup_global)
        lr = engine.get_lr()[0]
        local_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
        for micro in plan.micro_batches(batch, self.rank):
            samples = [self.pool[self.rows[i]] for i in micro] or [self.dummy]
            b = {k: v.to(engine.device) for k, v in self.collate(samples, self.pad_id).items()}
            want = rec.wanted(micro, step) if rec is not None else []
            if want:
                rec.arm()
            loss_sum = token_loss_sum(engine, b)
            if not micro:
                loss_sum = loss_sum * 0.0
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            if want:  # before engine.step(): the norms belong to the weights of the forward
                rec.collect(b, scale, micro, want)
            engine.step()
            local_sum += loss_sum.detach()  # a tensor: no device sync per micro-batch
        loss = _all_reduce_sum(float(local_sum)) / max(1, n_sup_global)
        dt = time.perf_counter() - t0
        return {
            "step": step + 1,
            "epoch": step // plan.steps_per_epoch,
            "loss": loss,
            "lr": lr,
            "tokens": n_tok_global,
            "padded_tokens": padded,
            "padding_efficiency": n_tok_global / max(1, padded),
            "supervised_tokens": n_sup_global,
            "tokens_per_s": n_tok_global / dt,
            "step_time_s": dt,
            "grad_norm": _grad_norm(engine),
        }


def _train_loop(
    loop: _Loop,
    use: str,
    out: Path,
    ckpts: Checkpoints,
    fingerprint: str,
    total: int,
    log_fn: Callable | None,
    resume: dict,
    first_loss: float | None,
) -> dict:
    """Steps ``resume["start"]..total-1`` with logging and checkpoints; returns segment totals."""
    from grads.io import append_jsonl

    s, rank, start = loop.s, loop.rank, int(resume["start"])
    pbar = None
    if rank == 0:
        from tqdm import tqdm

        pbar = tqdm(total=total, initial=start, desc=use, unit="step", dynamic_ncols=True)
    seg = {"tokens": 0, "padded": 0, "loss": float("nan"), "stopped": False, "done": start}
    seg_t0, cpu_t0 = time.perf_counter(), time.process_time()
    try:
        for step in range(start, total):
            row = loop.step(step)
            done = seg["done"] = step + 1
            seg["loss"] = row["loss"]
            seg["tokens"] += row["tokens"]
            seg["padded"] += row["padded_tokens"]
            first_loss = row["loss"] if first_loss is None else first_loss
            if rank == 0:
                append_jsonl(out / LOG_NAME, row)
                pbar.update(1)
                pbar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.2e}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    pad=f"{row['padding_efficiency']:.2f}",
                )
                if log_fn is not None and (done % s.log_every == 0 or done == total):
                    log_fn({f"{use}/{k}": v for k, v in row.items() if k != "step"}, done)
            if s.save_every and done % s.save_every == 0 and done < total:
                meta = {
                    "fingerprint": fingerprint,
                    "seed": s.seed,
                    "world_size": loop.world,
                    "global_batch": loop.plan.global_batch,
                    "total_steps": total,
                    "elapsed_s": resume["elapsed_s"] + time.perf_counter() - seg_t0,
                    "tokens": resume["tokens"] + seg["tokens"],
                }
                rec = loop.recording
                extra = {"recorded": rec.gather()} if rec is not None else None
                ckpts.save(
                    loop.engine,
                    done,
                    meta,
                    exclude_frozen=s.mode == "lora",
                    rank=rank,
                    keep=s.keep_checkpoints,
                    extra=extra,
                )
            if s.stop_after_steps is not None and done >= s.stop_after_steps and done < total:
                seg["stopped"] = True
                break
    finally:
        if pbar is not None:
            pbar.close()
    seg["seg_time"] = time.perf_counter() - seg_t0
    seg["cpu_s"] = time.process_time() - cpu_t0  # all threads: a load-robust cost on shared CPUs
    seg["first_loss"] = first_loss
    return seg


def _grad_norm(engine) -> float | None:
    gn = engine.get_global_grad_norm()
    if gn is None:
        return None
    return float(gn.item() if hasattr(gn, "item") else gn)


def _export(
    module,
    state: dict,
    tokenizer,
    s: TrainerSettings,
    model_cfg: dict,
    cache_dir: str | None,
    out: Path,
) -> dict:
    """Write ``adapter/`` (LoRA) and ``model/`` atomically; return their names under ``out``."""
    from grads.io import atomic_path

    paths = {"model_dir": None, "adapter_dir": None}
    if s.mode == "full":
        with atomic_path(out / MODEL_DIR) as tmp:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        paths["model_dir"] = MODEL_DIR
        return paths
    with atomic_path(out / ADAPTER_DIR) as tmp:
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    paths["adapter_dir"] = ADAPTER_DIR
    if s.save_merged:
        # Merge into a fresh copy of the base: the trained module may be partitioned (ZeRO-3) and
        # must not be mutated; reloading the adapter also proves that the adapter is loadable.
        from peft import PeftModel

        from grads.models import load_model

        base, _ = load_model(model_cfg, cache_dir=cache_dir)
        merged = PeftModel.from_pretrained(base, out / ADAPTER_DIR).merge_and_unload()
        with atomic_path(out / MODEL_DIR) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        paths["model_dir"] = MODEL_DIR
    return paths


def train(
    cfg: Any,
    use: str,
    out_dir: str | os.PathLike,
    ids: Sequence[str] | None = None,
    pool=None,
    log_fn: Callable[[dict, int], Any] | str | None = None,
) -> dict:
    """Resolve ``cfg`` once and run ``run_train`` on ``trainer.procs`` local processes.

    Workers are Hydra-free: they receive the resolved dict. ``log_fn`` must be picklable (a
    module-level function or a ``"module:function"`` string) when ``procs > 1``.
    """
    from grads.io import read_json
    from grads.launch import run_distributed

    cfg = _plain(cfg)
    procs = TrainerSettings.from_cfg(cfg, use).resolved_procs()
    ids = list(ids) if ids is not None else None
    if procs <= 1:
        return run_train(cfg, use, str(out_dir), ids, pool, log_fn)
    run_distributed("grads.training:run_train", procs, cfg, use, str(out_dir), ids, pool, log_fn)
    summary_path = Path(out_dir) / SUMMARY_NAME
    if not summary_path.exists():  # stop_after_steps: nothing final to report
        return {"use": use, "stopped": True}
    return read_json(summary_path)
