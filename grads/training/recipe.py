"""The training recipe, read top to bottom: setup -> resume -> loop -> export.

:func:`run_train` is what every rank runs; :func:`train` resolves the config once and starts
``trainer.procs`` Hydra-free workers. Each step of the recipe is one function below, in the order
it runs; the pieces it assembles live in the sibling modules (settings, DeepSpeed config, batch
plan, checkpoints, distributed helpers, export).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grads.features.store import features_source
from grads.training.checkpoints import Checkpoints
from grads.training.data import (
    FeatureRecording,
    pool_ids_of,
    row_stats,
    select_rows,
    warmup_subset,
    write_subset,
)
from grads.training.distributed import build_engine, ensure_dist, import_deepspeed
from grads.training.ds_config import fill_ds_config, load_ds_template
from grads.training.export import export_model
from grads.training.model import prepare_model
from grads.training.schedule import BatchPlan
from grads.training.settings import (
    CKPT_DIR,
    DS_CONFIG_NAME,
    LOG_NAME,
    SUMMARY_NAME,
    TrainerSettings,
)
from grads.training.steps import StepLoop, train_loop

log = logging.getLogger(__name__)


def run_fingerprint(
    s: TrainerSettings, use: str, model_cfg: dict, ids: list[str], global_batch: int
) -> str:
    # One definition of "the same training run", shared with the pipeline's stage keys.
    from grads.training.identity import resume_fingerprint

    world = global_batch // (s.micro_batch_size * s.grad_accum)
    return resume_fingerprint(s, use, model_cfg, ids, world)


@dataclasses.dataclass
class _Run:
    """Everything setup decides before the first step (shared by the later recipe steps)."""

    cfg: dict
    use: str
    s: TrainerSettings
    out: Path
    rank: int
    world: int
    on_cuda: bool
    record: bool
    t_start: float
    model_cfg: dict = dataclasses.field(default_factory=dict)
    cache_dir: str | None = None
    model: Any = None
    tokenizer: Any = None
    pool: Any = None
    subset: list[str] | None = None
    rows: list[int] = dataclasses.field(default_factory=list)
    row_ids: list[str] = dataclasses.field(default_factory=list)
    n_tok: list[int] = dataclasses.field(default_factory=list)
    n_sup: list[int] = dataclasses.field(default_factory=list)
    plan: BatchPlan | None = None
    total: int = 0
    fingerprint: str = ""


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
            ``FeatureRecording``) and ``warmup.fraction`` / ``warmup.max_samples`` subsample the pool.
        use: ``warmup`` (whole pool, exports a merged full model) or ``finetune``.
        out_dir: output folder (see :mod:`grads.training` for its layout). Rerunning the same
            command resumes from ``checkpoints/latest``; a completed run returns its summary.
        ids: sample ids to train on (``None``: the whole pool, or the warm-up's subset of it).
        pool: rows with ``id``, ``input_ids``, ``labels`` (list of dicts or ``datasets.Dataset``);
            ``None`` loads ``grads.data.pool.load_pool(cfg, tokenizer)``.
        log_fn: ``log_fn(row, step)`` called on rank 0 every ``log_every`` steps (e.g. W&B), or a
            ``"module:function"`` spec.

    Returns:
        The training summary (also written to ``train_summary.json``), on every rank.
    """
    from grads.launch import resolve_callable

    run = _start(cfg, use, Path(out_dir))
    log_fn = resolve_callable(log_fn)
    run.t_start = time.perf_counter()
    _load(run, ids, pool)
    done = _finished_summary(run)
    if done is not None:
        return done
    engine, ds_config, recording = _build_engine(run)
    ckpts, resume, first_loss = _resume(run, engine, recording, ds_config)
    loop = StepLoop(
        engine, run.s, run.plan, run.pool, run.rows, run.n_tok, run.n_sup, run.tokenizer, recording
    )
    ran = train_loop(
        loop, use, run.out, ckpts, run.fingerprint, run.total, log_fn, resume, first_loss
    )
    if ran["stopped"]:
        return {
            "use": use,
            "stopped": True,
            "steps": ran["done"],
            "total_steps": run.total,
            "final_loss": ran["loss"],
        }
    return _export_and_summarise(run, engine, ds_config, recording, ran, resume)


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------
def _start(cfg: Any, use: str, out: Path) -> _Run:
    """Settings (validated before anything loads), DeepSpeed and the process group."""
    import torch

    from grads import dist
    from grads.config_access import as_dict
    from grads.ds_ops import comm_op_for

    cfg = as_dict(cfg)
    s = TrainerSettings.from_cfg(cfg, use)
    record = use == "warmup" and features_source(cfg) == "warmup"  # validates before loading
    import_deepspeed()
    with comm_op_for(dist.world_size()):  # one process needs no comm op: neither built nor loaded
        ensure_dist()
    rank, world = dist.rank(), dist.world_size()
    on_cuda = torch.cuda.is_available()
    if not on_cuda and world > 1:
        # N CPU ranks x torch's default thread count oversubscribe the cores, and spinning
        # OpenMP threads then slow every rank down by far more than the split gains.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    return _Run(cfg, use, s, out, rank, world, on_cuda, record, t_start=0.0)


def _load(run: _Run, ids: Sequence[str] | None, pool) -> None:
    """The base model, the pool, the rows to train on, the batch plan and the run's fingerprint."""
    from grads import dist
    from grads.models import load_model

    s, cfg = run.s, run.cfg
    # Base model: LoRA initialisation must be identical on all ranks (and in the 1-process run),
    # so seed with the base seed here; per-rank seeds come after, for dropout.
    dist.seed_everything(s.seed)
    run.model_cfg = {
        **dict(cfg["model"]),
        "dtype": "bfloat16" if s.resolved_dtype() == "bf16" else "float32",
    }
    run.cache_dir = (cfg.get("paths") or {}).get("model_dir")
    run.model, run.tokenizer = load_model(run.model_cfg, cache_dir=run.cache_dir)
    if pool is None:
        from grads.data.pool import load_pool

        # The warm-up keeps the pool it tokenised beside its model: the stages after it open it.
        keep = run.out if run.use == "warmup" and run.rank == 0 else None
        pool = load_pool(cfg, run.tokenizer, keep_in=keep)
    run.pool = pool
    if run.use == "warmup" and ids is None:
        run.subset = warmup_subset(pool_ids_of(pool), s.fraction, s.max_samples, s.seed)
        ids = run.subset
    run.rows = select_rows(pool, ids)
    if not run.rows:
        raise ValueError("no samples to train on")
    run.row_ids, run.n_tok, run.n_sup = row_stats(pool, run.rows)
    run.plan = BatchPlan(
        len(run.rows),
        s.micro_batch_size,
        s.grad_accum,
        run.world,
        s.seed,
        lengths=run.n_tok if s.group_by_length else None,
        length_group_size=s.length_group_size,
    )
    run.total = run.plan.total_steps(s.epochs, s.max_steps)
    run.fingerprint = run_fingerprint(
        s, run.use, dict(cfg["model"]), sorted(run.row_ids), run.plan.global_batch
    )


def _finished_summary(run: _Run) -> dict | None:
    """The summary of a completed run of the same config in ``out`` (``None``: train)."""
    from grads.io import read_json

    if not (run.out / SUMMARY_NAME).exists():
        return None
    done = read_json(run.out / SUMMARY_NAME)
    if done.get("fingerprint") != run.fingerprint:
        raise RuntimeError(
            f"{run.out} holds a finished run with a different config/data "
            f"({done.get('fingerprint')} != {run.fingerprint}); use a new out_dir"
        )
    log.info("%s already trained in %s: skipping", run.use, run.out)
    return done


def _build_engine(run: _Run) -> tuple[Any, dict, FeatureRecording | None]:
    """LoRA / full model, the filled DeepSpeed config, the engine and the optional recorder."""
    s = run.s
    model = prepare_model(run.model, s)
    run.model = None  # the engine owns it now
    ds_config = fill_ds_config(load_ds_template(s.ds_config), s, run.world, run.on_cuda)
    engine = build_engine(model, s, ds_config, run.total, run.world)
    recording = (
        FeatureRecording(engine.module, run.cfg, run.plan, run.total, run.row_ids)
        if run.record
        else None
    )
    return engine, ds_config, recording


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------
def _resume(
    run: _Run, engine, recording: FeatureRecording | None, ds_config: dict
) -> tuple[Checkpoints, dict, float | None]:
    """Restore the latest checkpoint (or seed per rank for a fresh start); trim the step log.

    Returns the checkpoints, ``{"start", "elapsed_s", "tokens"}`` and the first logged loss.
    """
    from grads import dist
    from grads.io import read_jsonl, write_json, write_jsonl

    s, out, rank = run.s, run.out, run.rank
    ckpts = Checkpoints(out / CKPT_DIR)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpts.clean_stale()
        write_json(out / DS_CONFIG_NAME, ds_config)
    dist.barrier()
    resume = {"start": 0, "elapsed_s": 0.0, "tokens": 0, "resumed_from": None}
    latest = ckpts.latest()
    if latest is not None:
        meta = ckpts.load(engine, latest, exclude_frozen=s.mode == "lora", rank=rank)
        if meta["fingerprint"] != run.fingerprint:
            raise RuntimeError(
                f"checkpoint {latest} was written by a different config/data "
                f"({meta['fingerprint']} != {run.fingerprint}); use a new out_dir"
            )
        resume["start"] = resume["resumed_from"] = int(meta["step"])
        resume["elapsed_s"], resume["tokens"] = float(meta["elapsed_s"]), int(meta["tokens"])
        if recording is not None and rank == 0:
            recording.rows.update(ckpts.extra(latest).get("recorded") or {})
        log.info(
            "resuming %s from %s (step %d/%d)", run.use, latest.name, resume["start"], run.total
        )
    else:
        dist.seed_everything(s.seed + rank)
    first_loss = None
    if rank == 0:
        # Rows past the checkpoint were logged by the killed run and are about to be redone.
        old = read_jsonl(out / LOG_NAME) if (out / LOG_NAME).exists() else []
        kept = [r for r in old if int(r.get("step", 0)) <= resume["start"]]
        write_jsonl(out / LOG_NAME, kept)
        first_loss = kept[0]["loss"] if kept else None
    dist.barrier()
    return ckpts, resume, first_loss


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def _export_and_summarise(
    run: _Run, engine, ds_config: dict, recording: FeatureRecording | None, ran: dict, resume: dict
) -> dict:
    """Gather the weights, write the model (rank 0) and ``train_summary.json`` last."""
    from grads import dist
    from grads.io import read_json, write_json

    s, out = run.s, run.out
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    recorded = recording.gather() if recording is not None else None
    if recorded is not None and len(recorded) == len(run.pool) and s.mode == "lora":
        # Every pool sample is scored already: no features pass will load a merged model.
        s.save_merged = False
    # Export: gather the full state dict (collective under ZeRO-3), then rank 0 writes.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    summary = None
    if run.rank == 0:
        if state is None:
            state = engine.module.state_dict()
        paths = export_model(
            engine.module, state, run.tokenizer, s, run.model_cfg, run.cache_dir, out
        )
        summary = {**_summary(run, engine, zero_stage, ran, resume), **paths}
        if run.subset is not None:
            summary["subset"] = write_subset(out, s, run.row_ids, len(run.pool))
        if recorded is not None:
            summary["features"] = recording.write(out, recorded, pool_ids_of(run.pool))
        write_json(out / SUMMARY_NAME, summary)
        if s.clean_checkpoints:
            shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
    dist.barrier()
    if recording is not None:
        recording.close()
    if summary is None:
        summary = read_json(out / SUMMARY_NAME)
    return summary


def _summary(run: _Run, engine, zero_stage: int, ran: dict, resume: dict) -> dict:
    """``train_summary.json`` (without the export paths; see :mod:`grads.training`)."""
    s, plan = run.s, run.plan
    return {
        "use": run.use,
        "mode": s.mode,
        "completed": True,
        "fingerprint": run.fingerprint,
        "steps": run.total,
        "epochs": run.total / plan.steps_per_epoch,
        "num_samples": len(run.rows),
        "global_batch": plan.global_batch,
        "world_size": run.world,
        "zero_stage": zero_stage,
        "dtype": s.resolved_dtype(),
        "device": str(engine.device),
        "tokens": resume["tokens"] + ran["tokens"],
        "supervised_tokens_per_epoch": sum(run.n_sup),
        "wall_time_s": resume["elapsed_s"] + ran["seg_time"],
        "run_time_s": time.perf_counter() - run.t_start,
        "tokens_per_s": ran["tokens"] / max(1e-9, ran["seg_time"]),
        "loop_cpu_s": ran["cpu_s"],  # this segment, this rank's process
        "padding_efficiency": ran["tokens"] / max(1, ran["padded"]),
        "first_loss": ran["first_loss"],
        "final_loss": ran["loss"],
        "resumed_from_step": resume["resumed_from"],
        "seed": s.seed,
    }


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------
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
    from grads.config_access import as_dict
    from grads.io import read_json
    from grads.launch import run_distributed

    cfg = as_dict(cfg)
    procs = TrainerSettings.from_cfg(cfg, use).resolved_procs()
    _check_world(procs, use)
    ids = list(ids) if ids is not None else None
    if procs <= 1:
        return run_train(cfg, use, str(out_dir), ids, pool, log_fn)
    run_distributed("grads.training:run_train", procs, cfg, use, str(out_dir), ids, pool, log_fn)
    summary_path = Path(out_dir) / SUMMARY_NAME
    if not summary_path.exists():  # stop_after_steps: nothing final to report
        return {"use": use, "stopped": True}
    return read_json(summary_path)


def _check_world(procs: int, use: str) -> None:
    """Under torchrun or several nodes the launcher's processes train: the config (whose global
    batch the stage key hashes) must describe them."""
    from grads.launch import session_world

    world = session_world()
    if world is not None and world != procs:
        raise ValueError(
            f"{use} would train on trainer.procs x dist.nnodes = {procs} processes, but the "
            f"launcher started {world}: leave trainer.procs / {use}.procs to the launcher"
        )
