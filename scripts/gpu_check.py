"""GPU readiness check: every CUDA path of grads in one process, one table, in under 8 minutes.

Sections (each case in its own try/except, so one failure still prints the rest of the table):

* ``env``       versions, GPU, DeepSpeed's accelerator, and an import of every carried package;
* ``grads``     ``per_sample_grad_norms`` on the device against a float64 per-sample autograd reference
  on the CPU (same weights, upcast), fp32 and bf16, for tiny tied/untied Llamas and a randomly
  initialised model of SmolLM2-135M's shape; max relative error over loss/embed/lm_head/tied;
* ``speed``     features vs one training step vs the naive per-sample loop (batch 16 x 512, bf16,
  SmolLM2 shape): tokens/s and peak ``torch.cuda.max_memory_allocated`` above the loaded model, modes
  interleaved in one process; ratios features/naive (goal >= 10x) and features/train;
* ``deepspeed`` ``deepspeed.initialize`` through the trainer's own helpers (``fill_ds_config``,
  ``build_engine``) in bf16: LoRA and full under ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload, a few steps
  on one repeated batch, losses finite and decreasing; the JIT-built ops are built first, timed;
* ``smoke``     ``grads.pipeline.run(experiment=smoke)`` end to end (tiny model), asserting from
  ``metrics.json`` that every stage with a model recorded the expected device.

Without CUDA (or with ``--cpu``) the same code paths run at reduced sizes on the CPU: a 2-layer model
of SmolLM2's width (vocabulary 4096), small batches, no CPU-offload case (its C++ op takes minutes to
build); ``tests/test_gpu_check.py`` runs that mode. Rows print as they finish, and the table is
rewritten to ``--out`` after each row, so a run killed at its time limit still leaves its results.

Usage::

    bash scripts/gpu_run.sh --out "$OUT"    # on the GPU machine (installs the carried wheels first)
    python scripts/gpu_check.py --cpu       # reduced CPU mode
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import faulthandler
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without an install
    sys.path.insert(0, str(REPO))

# SmolLM2-135M's architecture (its config.json): the speed numbers use random weights of this shape,
# which is the same arithmetic as the real model (whose 94 MB GGUF does not travel to the GPU box).
SMOLLM2_ARCH = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
SMOLLM2_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Max relative error of the features against the float64 reference that counts as a pass. bf16 runs
# the backbone in bf16 (8 mantissa bits), so its error is that of the activations, not of our maths.
RTOL = {"float32": 1e-3, "bfloat16": 0.1}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode (full on CUDA, reduced on the CPU)."""

    smollm2_layers: int
    smollm2_vocab: int
    grads_batch: tuple[int, int]  # (samples, max tokens) of the gradient check
    speed_batch: tuple[int, int]
    speed_repeats: int
    speed_chunk_bytes: int  # the features pass's buffer cap: small enough for its long-sample path
    ds_model: str  # "smollm2" | "tiny"
    ds_batch: tuple[int, int]
    ds_steps: int
    ds_trainers: tuple[str, ...]
    smoke_overrides: tuple[str, ...]


CUDA_SIZES = Sizes(
    smollm2_layers=30,
    smollm2_vocab=49152,
    grads_batch=(4, 64),
    speed_batch=(16, 512),
    speed_repeats=3,
    speed_chunk_bytes=1 << 26,  # the pipeline's default: 512-token samples take the long path
    ds_model="smollm2",
    ds_batch=(4, 256),
    ds_steps=6,
    ds_trainers=("cpu", "zero2", "zero3", "zero3_offload"),  # cpu.json: ZeRO-0, the smoke's
    smoke_overrides=(),
)
# The smoke overrides mirror tests/test_pipeline.py's TINY: 40 samples, 2 steps, 8 eval items.
CPU_SIZES = Sizes(
    smollm2_layers=2,
    smollm2_vocab=4096,  # vocabulary-wide work dominates on a CPU; the code paths are the same
    grads_batch=(3, 12),
    speed_batch=(2, 32),
    speed_repeats=1,
    speed_chunk_bytes=4 * 4096 * 16,  # 16 tokens per buffer < 31: the long path, as on CUDA
    ds_model="tiny",
    ds_batch=(2, 16),
    ds_steps=4,
    ds_trainers=("cpu", "zero2", "zero3"),
    smoke_overrides=(
        "trainer.dtype=bf16",  # what `auto` is on CUDA
        "domain.pool_limit=40",
        "data.max_seq_len=64",
        "warmup.max_steps=2",
        "finetune.max_steps=2",
        "eval.limit=8",
        "eval.task_limits=null",
        "eval.batch_size=16",
    ),
)


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    section: str
    case: str
    status: str  # ok | FAIL | skip
    result: str
    seconds: float
    data: dict = dataclasses.field(default_factory=dict)


class Report:
    """Collects rows, prints each as it lands and rewrites ``gpu_check.{md,json}`` under ``out``."""

    def __init__(self, out: Path | None, budget_s: float, header: dict):
        self.rows: list[Row] = []
        self.out, self.header = out, header
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + budget_s
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(self._line(row), flush=True)
        self._save()
        return row

    @staticmethod
    def _line(r: Row) -> str:
        return f"| {r.section:<9} | {r.case:<28} | {r.status:<4} | {r.seconds:7.1f} | {r.result} |"

    def table(self) -> str:
        head = f"| {'section':<9} | {'case':<28} | {'ok?':<4} | {'s':>7} | result |"
        sep = f"|{'-' * 11}|{'-' * 30}|{'-' * 6}|{'-' * 9}|--------|"
        return "\n".join([head, sep, *(self._line(r) for r in self.rows)])

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def _save(self) -> None:
        if self.out is None:
            return
        info = " ".join(f"{k}={v}" for k, v in self.header.items())
        (self.out / "gpu_check.md").write_text(f"{info}\n\n{self.table()}\n")
        blob = {"header": self.header, "rows": [dataclasses.asdict(r) for r in self.rows]}
        (self.out / "gpu_check.json").write_text(json.dumps(blob, indent=1, default=str))


def run_case(
    rep: Report, section: str, case: str, fn: Callable[[], tuple[str, dict]], need_s: float = 0.0
) -> Row:
    """Run one case: ``fn() -> (result text, data)``; an exception or a failed check is a FAIL row.

    A case whose estimated cost ``need_s`` exceeds the time left is skipped, so the table always
    completes inside the budget.
    """
    if rep.left() < need_s:
        return rep.add(Row(section, case, "skip", f"time budget ({rep.left():.0f}s left)", 0.0))
    t0 = time.perf_counter()
    try:
        result, data = fn()
        status = "ok" if data.pop("ok", True) else "FAIL"
    except (Exception, SystemExit) as exc:  # noqa: BLE001 (one case must not stop the table)
        traceback.print_exc()
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        result, data, status = f"{type(exc).__name__}: {msg}", {}, "FAIL"
    try:
        _free()
    except Exception:  # noqa: BLE001 (a sticky CUDA error resurfaces here; the next case shows it)
        traceback.print_exc()
    return rep.add(Row(section, case, status, result, time.perf_counter() - t0, data))


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Models and batches
# --------------------------------------------------------------------------------------------------
def smollm2_shaped(layers: int, vocab: int = SMOLLM2_ARCH["vocab_size"], seed: int = 0):
    """A randomly initialised float32 Llama of SmolLM2-135M's shape (``layers`` decoder layers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_ARCH, "num_hidden_layers": int(layers), "vocab_size": vocab})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def build_model(name: str, sizes: Sizes):
    """``tiny_tied`` / ``tiny_untied`` (grads.models.build_tiny) or ``smollm2`` (random weights)."""
    from grads.models import build_tiny

    if name == "smollm2":
        return smollm2_shaped(sizes.smollm2_layers, sizes.smollm2_vocab)
    return build_tiny(tied=name == "tiny_tied", dtype="float32")[0]


def ragged_batch(vocab: int, batch: int, seq: int, seed: int = 0, full: bool = False) -> dict:
    """Right-padded random samples of lengths in ``[seq/2, seq]`` with a masked prompt each.

    ``full``: every sample ``seq`` long and supervised from its second token (the training step's
    least favourable case for the feature pass).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if not full:
        for b in range(batch):
            n = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
            prompt = int(torch.randint(1, max(2, n // 2), (1,), generator=g))
            mask[b, n:], ids[b, n:] = 0, 0
            labels[b, n:], labels[b, :prompt] = -100, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_norms(model, batch: dict) -> dict[str, list[float]]:
    """Per-sample autograd in float64 on the CPU, batch size 1 (no padding), on ``model``'s weights.

    E and W are separate Parameters in the copy, so a tied model yields the lookup part, the
    projection part and (their sum) the shared matrix's gradient.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    ref = copy.deepcopy(model).to("cpu", torch.float64)
    emb, head = ref.get_input_embeddings(), ref.get_output_embeddings()
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    for p in ref.parameters():
        p.requires_grad_(False)
    emb.weight.requires_grad_(True)
    head.weight.requires_grad_(True)
    out: dict[str, list[float]] = {k: [] for k in ("loss", "embed", "lm_head", "tied")}
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        logits = ref(input_ids=ids[None, :n], use_cache=False).logits[0, :-1]
        target = labels[1:n]
        sup = target != -100
        loss = F.cross_entropy(logits[sup], target[sup])
        ga, gb = torch.autograd.grad(loss, [emb.weight, head.weight])
        out["loss"].append(loss.item())
        out["embed"].append(ga.norm().item())
        out["lm_head"].append(gb.norm().item())
        out["tied"].append((ga + gb).norm().item())
    return out


def max_rel_err(got: dict, ref: dict, keys: list[str]) -> dict[str, float]:
    return {
        k: max(abs(float(a) - b) / max(abs(b), 1e-30) for a, b in zip(got[k], ref[k])) for k in keys
    }


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def env_section(rep: Report, device) -> None:
    """Versions, device, DeepSpeed's accelerator and an import of each package the check needs."""
    import importlib
    import importlib.metadata as md

    import torch

    def info():
        gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
        data = {
            "device": str(device),
            "gpu": gpu,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported() if device.type == "cuda" else True,
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
            "python": sys.version.split()[0],
        }
        return ", ".join(f"{k}={v}" for k, v in data.items()), data

    def imports():
        mods = {
            "transformers": "transformers",
            "peft": "peft",
            "datasets": "datasets",
            "hydra-core": "hydra",
            "omegaconf": "omegaconf",
            "deepspeed": "deepspeed",
            "lm_eval": "lm_eval.models.huggingface",
            "KDEpy": "KDEpy",
            "pyarrow": "pyarrow",
            "pandas": "pandas",
        }
        versions, missing = {}, []
        for dist, mod in mods.items():
            try:
                importlib.import_module(mod)
                versions[dist] = md.version(dist)
            except Exception as exc:  # noqa: BLE001
                missing.append(f"{dist} ({type(exc).__name__}: {str(exc)[:60]})")
        from deepspeed.accelerator import get_accelerator

        versions["ds_accelerator"] = get_accelerator().device_name()
        text = " ".join(f"{k}={v}" for k, v in versions.items())
        ok = not missing and versions["ds_accelerator"] == device.type
        return (f"MISSING {missing} " if missing else "") + text, {"ok": ok, **versions}

    run_case(rep, "env", "device", info)
    run_case(rep, "env", "imports", imports)


def grads_section(rep: Report, sizes: Sizes, device) -> None:
    """Features on ``device`` vs the CPU float64 reference, per model and dtype."""
    import torch

    from grads.features.gradients import per_sample_grad_norms

    for name in ("tiny_tied", "tiny_untied", "smollm2"):
        for dtype in (torch.float32, torch.bfloat16):

            def case(name=name, dtype=dtype):
                model = build_model(name, sizes).to(dtype)  # weights rounded once, shared by both
                vocab = model.get_input_embeddings().weight.shape[0]
                batch = ragged_batch(vocab, *sizes.grads_batch, seed=1)
                ref = reference_norms(model, batch)
                model.to(device)
                got = per_sample_grad_norms(model, **batch, stats=True)
                keys = ["loss", "embed", "lm_head"] + (["tied"] if "tied" in got else [])
                finite = all(torch.isfinite(got[k]).all() for k in keys)
                err = max_rel_err(got, ref, keys)
                worst = max(err.values())
                tol = RTOL[str(dtype).removeprefix("torch.")]
                text = f"max rel err {worst:.1e} (tol {tol:g}) " + " ".join(
                    f"{k}={v:.1e}" for k, v in err.items()
                )
                return text, {"ok": finite and worst <= tol, "max_rel_err": err}

            dt = "fp32" if dtype == torch.float32 else "bf16"
            need = 30.0 if name == "smollm2" else 2.0
            run_case(rep, "grads", f"{name} {dt}", case, need_s=need)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_extra_mib(fn: Callable[[], object], device) -> float | None:
    """Peak allocated GPU memory while ``fn`` runs, above what was allocated before (MiB)."""
    import torch

    if device.type != "cuda":
        return None
    _free()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def speed_modes(model, batch: dict, chunk_bytes: int) -> dict[str, Callable[[], dict]]:
    """One training step, the feature pass (at ``chunk_bytes`` and at 1 GiB) and the naive loop."""
    from grads.features.gradients import per_sample_grad_norms

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def train() -> dict:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        return {}

    def features(cap: int = chunk_bytes) -> dict:
        out = per_sample_grad_norms(model, ids, mask, labels, stats=True, chunk_bytes=cap)
        return {k: v.tolist() for k, v in out.items()}

    def naive() -> dict:
        res: dict[str, list[float]] = {"embed": [], "lm_head": []}
        for i in range(len(ids)):
            one = slice(i, i + 1)
            model(input_ids=ids[one], attention_mask=mask[one], labels=labels[one]).loss.backward()
            res["embed"].append(emb.weight.grad.float().norm().item())
            res["lm_head"].append(head.weight.grad.float().norm().item())  # same tensor when tied
            model.zero_grad(set_to_none=True)
        return res

    return {
        "train": train,
        "features": features,
        "features_chunk1g": lambda: features(1 << 30),
        "naive": naive,
    }


def _time_modes(fns: dict, device, repeats: int) -> tuple[dict, dict]:
    """Median seconds per mode, modes interleaved round-robin after one untimed warm-up round."""
    times: dict[str, list[float]] = {m: [] for m in fns}
    results: dict[str, dict] = {}
    for r in range(1 + repeats):
        for m, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            results[m] = fn()
            _sync(device)
            if r:
                times[m].append(time.perf_counter() - t0)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}, results


def speed_section(rep: Report, sizes: Sizes, device) -> None:
    """tokens/s and peak memory of features vs training step vs naive loop, bf16, SmolLM2 shape."""
    import torch

    state: dict = {}

    def measure():
        model = smollm2_shaped(sizes.smollm2_layers, sizes.smollm2_vocab).to(device, torch.bfloat16)
        for p in model.parameters():
            p.requires_grad_(True)
        batch = ragged_batch(sizes.smollm2_vocab, *sizes.speed_batch, seed=2, full=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        fns = speed_modes(model, batch, sizes.speed_chunk_bytes)
        med, results = _time_modes(fns, device, sizes.speed_repeats)
        tokens = sizes.speed_batch[0] * sizes.speed_batch[1]
        state.update(
            med=med, tokens=tokens, mem={m: _peak_extra_mib(f, device) for m, f in fns.items()}
        )
        feat, ref = results["features"], results["naive"]
        pairs = [("tied", "lm_head")] if "tied" in feat else [("embed", "embed"), ("lm_head",) * 2]
        state["err"] = max(abs(a - b) / abs(b) for k, r in pairs for a, b in zip(feat[k], ref[r]))
        B, T = sizes.speed_batch
        return f"batch {B}x{T} bf16, {sizes.smollm2_layers} layers, {device}", {}

    run_case(rep, "speed", "setup + timing", measure, need_s=60.0)
    if "med" not in state:
        return
    for m, sec in state["med"].items():
        mem = state["mem"][m]
        text = f"{state['tokens'] / sec:10.0f} tok/s  {sec * 1e3:8.1f} ms/batch" + (
            f"  peak +{mem:.0f} MiB" if mem is not None else ""
        )
        data = {"tokens_per_s": state["tokens"] / sec, "seconds": sec, "peak_extra_mib": mem}
        rep.add(Row("speed", m, "ok", text, sec, data))
    med = state["med"]
    for a, b, goal in (("features", "naive", 10.0), ("features", "train", None)):
        ratio = med[b] / med[a]
        ok = goal is None or device.type != "cuda" or ratio >= goal
        note = f" (goal >= {goal:g}x)" if goal else ""
        rep.add(
            Row(
                "speed",
                f"{a} / {b}",
                "ok" if ok else "FAIL",
                f"{ratio:.2f}x{note}",
                0.0,
                {"ratio": ratio},
            )
        )
    rep.add(
        Row(
            "speed",
            "features vs naive (bf16)",
            "ok",
            f"max rel err {state['err']:.1e}",
            0.0,
            {"max_rel_err": state["err"]},
        )
    )


def ds_settings(trainer: str, mode: str, sizes: Sizes):
    """``TrainerSettings`` of ``conf/trainer/<trainer>.yaml`` adapted to a few steps on one batch."""
    from grads.training import TrainerSettings

    lr = (
        {"lora": 1e-3, "full": 1e-4}
        if sizes.ds_model == "smollm2"
        else {"lora": 1e-2, "full": 1e-3}
    )
    trainer_cfg = compose_cfg([f"trainer={trainer}"])["trainer"]
    cfg = {
        "model": {
            "lora_target_modules": SMOLLM2_LORA
            if sizes.ds_model == "smollm2"
            else ["q_proj", "v_proj"]
        },
        "trainer": trainer_cfg,
        "finetune": {
            "procs": 1,
            "mode": mode,
            "dtype": "bf16",
            "micro_batch_size": sizes.ds_batch[0],
            "grad_accum": 1,
            "warmup_ratio": 0.0,
            "lr": lr[mode],
            "lora": {"dropout": 0.0},
            "max_steps": sizes.ds_steps,
            "save_every": 0,
        },
        "seed": 0,
    }
    return TrainerSettings.from_cfg(cfg, "finetune")


def ds_steps(trainer: str, mode: str, sizes: Sizes, device) -> tuple[str, dict]:
    """A few bf16 DeepSpeed steps on one repeated batch; losses must be finite and decreasing."""
    import torch

    from grads.training import (
        build_engine,
        fill_ds_config,
        load_ds_template,
        prepare_model,
        token_loss_sum,
    )

    s = ds_settings(trainer, mode, sizes)
    name = "smollm2" if sizes.ds_model == "smollm2" else "tiny_tied"
    model = prepare_model(build_model(name, sizes).to(torch.bfloat16), s)
    ds = fill_ds_config(load_ds_template(s.ds_config), s, 1, device.type == "cuda")
    params = ds["optimizer"]["params"]
    fallback = OPS_BUILT.get("FusedAdamBuilder") is False and params["torch_adam"] is False
    fallback = fallback and "offload_optimizer" not in ds["zero_optimization"]
    if fallback:
        params["torch_adam"] = True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine = build_engine(model, s, ds, s.max_steps, world_size=1)
    # Not the embedding's shape: ZeRO-3 leaves an empty placeholder in place of each parameter.
    batch = ragged_batch(int(engine.module.config.vocab_size), *sizes.ds_batch, seed=3)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    losses, times = [], []
    for _ in range(s.max_steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = token_loss_sum(engine, batch) / n_sup
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        losses.append(float(loss.detach()))
        _sync(device)
        times.append(time.perf_counter() - t0)
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    data = {
        "losses": losses,
        "step_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0],
        "engine_device": str(engine.device),
        "optimizer": type(opt).__name__,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, model
    ok = all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    ok = ok and data["engine_device"].split(":")[0] == device.type
    text = (
        f"loss {losses[0]:.3f}->{losses[-1]:.3f} ({len(losses)} steps), "
        f"{data['step_s'] * 1e3:.0f} ms/step, {data['optimizer']} on {data['engine_device']}"
        + (f", peak {data['peak_mib']:.0f} MiB" if data["peak_mib"] is not None else "")
        + (" (torch AdamW: FusedAdam did not build)" if fallback else "")
    )
    return text, {"ok": ok, **data}


# Which JIT ops built (``build_ops``); a failed FusedAdam build makes the ZeRO rows fall back to
# torch's AdamW, so that they still test the ZeRO paths while the ops row shows the failure.
OPS_BUILT: dict[str, bool] = {}


def build_ops() -> tuple[str, dict]:
    """Build (JIT) the DeepSpeed ops the CUDA trainer uses, so their cost shows up on its own row."""
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    took, errors = {}, []
    for builder in (FusedAdamBuilder, CPUAdamBuilder):
        t0 = time.perf_counter()
        try:
            builder().load(verbose=False)
            OPS_BUILT[builder.__name__] = True
            took[builder.__name__] = round(time.perf_counter() - t0, 1)
        except Exception as exc:  # noqa: BLE001 (reported; the other op may still build)
            traceback.print_exc()
            OPS_BUILT[builder.__name__] = False
            errors.append(f"{builder.__name__}: {type(exc).__name__}: {str(exc)[:80]}")
    text = " ".join(f"{k} {v}s" for k, v in took.items()) + (f" FAILED {errors}" if errors else "")
    return text, {"ok": not errors, "seconds": took}


def deepspeed_section(rep: Report, sizes: Sizes, device) -> None:
    from grads.training.distributed import ensure_dist, import_deepspeed

    def init():
        import_deepspeed()
        ensure_dist()  # one (1-rank) process group for every engine below, as run_train does
        import torch.distributed as tdist

        return f"backend {tdist.get_backend()}", {"backend": tdist.get_backend()}

    row = run_case(rep, "deepspeed", "init_distributed", init)
    if row.status != "ok":
        return
    if device.type == "cuda":
        run_case(rep, "deepspeed", "JIT ops", build_ops, need_s=120.0)
    for trainer in sizes.ds_trainers:
        for mode in ("lora", "full"):
            need = 40.0 if device.type == "cuda" else 5.0
            run_case(
                rep,
                "deepspeed",
                f"{trainer} {mode}",
                lambda t=trainer, m=mode: ds_steps(t, m, sizes, device),
                need_s=need,
            )


def compose_cfg(overrides: list[str]) -> dict:
    """The resolved primary config with ``overrides``, composed as the ``grads`` CLI would."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grads.cli.main import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


MODEL_STAGES = ("warmup", "features", "finetune", "evaluate")  # select needs no model


def smoke_section(rep: Report, sizes: Sizes, device, workdir: Path) -> None:
    """``experiment=smoke`` end to end; each stage with a model must report ``device``'s type."""
    from grads.pipeline import run

    state: dict = {}

    def pipeline():
        out = workdir / "smoke"
        out.mkdir(parents=True, exist_ok=True)
        overrides = ["experiment=smoke", f"paths.output_dir={out}", *sizes.smoke_overrides]
        cwd = os.getcwd()
        os.chdir(out)  # outside Hydra the run folder is ./outputs/runs
        try:
            state["m"] = m = run(compose_cfg(overrides))
        finally:
            os.chdir(cwd)
        text = f"domain_acc={m.get('domain_acc')} n_selected={m.get('n_selected')}"
        return text, {
            "ok": m.get("stages") == ["warmup", "features", "select", "finetune", "evaluate"]
        }

    run_case(rep, "smoke", "pipeline run", pipeline, need_s=30.0)
    if "m" not in state:
        return
    for stage, cost in state["m"]["cost"].items():
        got = cost.get("device")
        if stage in MODEL_STAGES:
            ok = isinstance(got, str) and got.split(":")[0] == device.type
            status, text = ("ok" if ok else "FAIL"), f"device={got} (expected {device.type})"
        else:
            status, text = "ok", f"device={got} (no model)"
        rep.add(
            Row(
                "smoke",
                f"{stage} device",
                status,
                f"{text}, {cost['wall_s']:.1f}s{_peaks(cost)}",
                0.0,
                {"device": got, "peak_gpu_gb": cost.get("peak_gpu_gb")},
            )
        )


def _peaks(cost: dict) -> str:
    """The stage's peak memory, as the pipeline measured it."""
    parts = [f"{label} {cost[key]:.2f} GB" for key, label in
             (("peak_gpu_gb", "peak GPU"), ("peak_rss_gb", "peak RSS")) if cost.get(key) is not None]  # fmt: skip
    return f", {', '.join(parts)}" if parts else ""


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
SECTIONS = ("env", "grads", "speed", "deepspeed", "smoke")


def _setup_env(cpu: bool) -> None:
    """Environment the sections rely on, set before torch/deepspeed are imported."""
    for k, v in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("WANDB_MODE", "disabled"),
    ):
        os.environ.setdefault(k, v)
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the reduced mode must not touch a GPU
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="reduced CPU mode even where CUDA exists")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip cases past this many s")
    ap.add_argument(
        "--ds-trainers", default=None, help="trainer configs of the deepspeed section (comma list)"
    )
    ap.add_argument("--out", default=None, help="folder for gpu_check.md / gpu_check.json")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    _setup_env(args.cpu)
    # A hang (a collective, a JIT build lock) prints every thread's stack and exits shortly after the
    # budget, before an outer timeout would kill the process without a word; rows so far are saved.
    faulthandler.dump_traceback_later(args.budget_s + 90.0, exit=True)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if cuda and os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        print(f"note: DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} -> cuda for the CUDA check")
        os.environ["DS_ACCELERATOR"] = "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sizes = CUDA_SIZES if cuda else CPU_SIZES
    if args.ds_trainers:
        sizes = dataclasses.replace(sizes, ds_trainers=tuple(args.ds_trainers.split(",")))
    header = {"mode": "cuda" if cuda else "cpu (reduced)", "device": str(device)}
    if cuda:
        header["gpu"] = torch.cuda.get_device_name(0)
    rep = Report(Path(args.out) if args.out else None, args.budget_s, header)
    print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    with contextlib.ExitStack() as stack:
        workdir = (
            Path(args.workdir)
            if args.workdir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        )
        runners = {
            "env": lambda: env_section(rep, device),
            "grads": lambda: grads_section(rep, sizes, device),
            "speed": lambda: speed_section(rep, sizes, device),
            "deepspeed": lambda: deepspeed_section(rep, sizes, device),
            "smoke": lambda: smoke_section(rep, sizes, device, workdir),
        }
        for name in sections:
            try:
                runners[name]()
            except Exception as exc:  # noqa: BLE001 (a section's own set-up failed)
                traceback.print_exc()
                rep.add(Row(name, "section", "FAIL", f"{type(exc).__name__}: {exc}"[:160], 0.0))
    total = time.perf_counter() - rep.t0
    print(f"\n{' '.join(f'{k}={v}' for k, v in header.items())} total={total:.0f}s\n")
    print(rep.table())
    bad = rep.failures()
    print(f"\n{len(rep.rows) - len(bad)} ok/skip, {len(bad)} FAIL")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
