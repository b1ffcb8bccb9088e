"""The GrADS pipeline: warm-up -> features -> select -> fine-tune -> evaluate, with a stage cache.

Each stage's output lives in a content-addressed folder ``<cache_dir>/<stage>/<key>`` whose key hashes
exactly the part of the resolved config the stage depends on, chained through its inputs' keys::

    warmup   = H(model + weights, pool files' content, data, trainer(warmup))
    features = H(warmup, feature options)
    select   = H(features, selector, budget, seed[, select.balance])  (budget dropped for budget-free selectors)
    finetune = H(select, model + weights, data, trainer(finetune))
    evaluate = H(finetune, eval settings, task lists, task files' and eval data's content)

Keys and their parts live in :mod:`grads.identity` (they hash the *content* of every file a stage
reads); the cache, with one lock per key and a private work folder per attempt, in :mod:`grads.cache`.
A killed run leaves no half-written artefact, and re-running the same command resumes at the first
missing stage (training stages also resume from their checkpoints in the adopted work folder).
Concurrent jobs on one cache compute each key once: the second waits and reuses the result. Sweeps
share the expensive work: warm-up and features do not depend on the selector or the budget.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grads.cache import StageCache
from grads.constants import STAGES
from grads.identity import CACHE_VERSION
from grads.io import read_json, write_json, write_text
from grads.stages import STAGES as STAGE_OBJECTS
from grads.stages import Job, StageInterrupted
from grads.stages.keys import StageId, stage_identities, stage_keys

__all__ = ["CACHE_VERSION", "STAGES", "StageCache", "StageInterrupted", "run", "stage_keys"]

log = logging.getLogger(__name__)


def resolve_features_cfg(cfg: dict, selector: Any = None) -> dict:
    """Resolve ``features.ifd=auto`` (IFD only when the selector needs it) in a copy of ``cfg``.

    ``selector``: the job's selector (instantiated from ``cfg["selector"]`` when not given).
    """
    feats = dict(cfg.get("features") or {})
    if selector is None:
        from hydra.utils import instantiate

        selector = instantiate(cfg["selector"])
    needs = tuple(getattr(selector, "requires", ()) or ())
    if feats.get("ifd", "auto") == "auto":
        feats["ifd"] = "ifd" in needs
    if any("_tok_" in c for c in needs):
        feats["stats"] = True
    from grads.features.representations import resolve_features_representations

    return {**cfg, "features": resolve_features_representations(cfg, feats, selector)}


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------
def run_info() -> dict:
    """Provenance saved with every run: git SHA, package versions, host."""
    import importlib.metadata as md

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
        return out.stdout.strip()

    try:
        sha, dirty = git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    versions = {}
    for pkg in (
        "torch",
        "transformers",
        "deepspeed",
        "peft",
        "lm_eval",
        "hydra-core",
        "KDEpy",
        "datasets",
    ):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "versions": versions,
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs/runs") / time.strftime("%Y-%m-%d/%H-%M-%S")


def job_identities(resolved: dict, stages=STAGES) -> dict[str, StageId]:
    """Keys (and what they hash) of ``stages`` and of the stages they read from, for a resolved
    config as written to ``config_resolved.yaml`` (``grads-cache gc`` recomputes them too)."""
    return stage_identities(resolve_features_cfg(resolved), list(stages or STAGES))


def _entry_record(ident: StageId) -> dict:
    """What a cache entry stores about itself (``identity.json``)."""
    return {
        "summary": ident.summary,
        "upstream": ident.identity["upstream"],
        "identity": ident.identity,
    }


def run(cfg) -> dict:
    """Run the configured stages for one job; returns (and writes) its ``metrics.json``."""
    from hydra.utils import instantiate

    from grads.data.pool import shared_pools
    from grads.selectors import balance

    resolved, stages, run_dir = _prepare(cfg)
    tracker = instantiate(resolved["logger"]) if resolved.get("logger") else None
    selector = instantiate(resolved["selector"])  # once per job: features, select, costs
    resolved = resolve_features_cfg(resolved, selector)
    ids = _identities_and_task_check(resolved, stages)
    # select.balance: the pool's groups, checked now rather than after the warm-up
    labels = balance.preflight(resolved, selector) if "select" in stages else None
    job = Job(
        cfg=resolved,
        selector=selector,
        keys={s: i.key for s, i in ids.items()},
        tracker=tracker,
        cache=StageCache(resolved["paths"]["cache_dir"]),
        stages=tuple(stages),
        labels=labels,
    )
    _start_tracker(job, run_dir)
    try:
        t_run = time.time()
        with shared_pools():  # the stages of this job tokenise the pool once
            costs = run_stages(job, ids)
        metrics = _assemble(job, costs, time.time() - t_run)
        _finish(job, metrics, run_dir)
    finally:
        if tracker is not None:
            tracker.finish()
    _print_summary(metrics)
    return metrics


def _prepare(cfg) -> tuple[dict, list[str], Path]:
    """Validate, resolve, check the stage list and task files; write the run's provenance."""
    from omegaconf import DictConfig, OmegaConf

    from grads.config import validate_config

    cfg = validate_config(cfg)  # unknown keys, bad values: fail now; paths.* made absolute
    if isinstance(cfg, DictConfig):
        resolved: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    else:
        resolved = dict(cfg)
    stages = list(resolved.get("stages") or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages={stages}: unknown {unknown}; expected a subset of {list(STAGES)}")
    run_dir = _run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    write_json(run_dir / "run_info.json", run_info())
    return resolved, stages, run_dir


def _identities_and_task_check(resolved: dict, stages: list[str]) -> dict[str, StageId]:
    """The stage keys, then the evaluation tasks checked (bad task files fail here, before any
    model is loaded) unless the evaluate stage is already in the cache: its key hashes every task
    file and data file, so a hit was checked when it ran, and a cached rerun skips lm-eval's
    task loading (seconds)."""
    from grads.evaluation import validate_tasks

    try:
        ids = stage_identities(resolved, stages)
    except Exception:
        if "evaluate" in stages:
            validate_tasks(resolved)  # a broken task file: say which, not where hashing stopped
        raise
    cache = StageCache(resolved["paths"]["cache_dir"])
    if "evaluate" in stages and not cache.done("evaluate", ids["evaluate"].key):
        validate_tasks(resolved)
    return ids


def _start_tracker(job: Job, run_dir: Path) -> None:
    if job.tracker is None:
        return
    from grads.selectors.balance import method_name

    cfg = job.cfg
    dom, sel, bud, model = (
        cfg["domain"]["name"],
        method_name(cfg),
        cfg["budget"].get("name", "?"),
        cfg["model"]["name"],
    )
    job.tracker.start(
        name=f"{dom}-{sel}-{bud}-s{cfg['seed']}",
        group=str(cfg.get("group")),
        tags=[dom, sel, bud, model, *cfg.get("tags", [])],
        config=cfg,
        run_dir=str(run_dir),
    )


@contextlib.contextmanager
def stage_memory() -> Iterator[dict]:
    """Measure one stage's peak memory into the yielded dict: ``peak_rss_gb``, this process's peak
    resident memory while the stage ran (workers a distributed stage starts are not counted), and
    ``peak_gpu_gb``, torch's peak allocated CUDA memory, where CUDA is in use. Memory the previous
    stage freed is handed back first, so each stage's peak starts from what is live."""
    import gc

    from grads.io import peak_rss_gb, release_memory, reset_peak_rss

    gc.collect()
    release_memory()
    reset_peak_rss()
    cuda = _cuda_in_use()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    out: dict = {}
    try:
        yield out
    finally:
        out["peak_rss_gb"] = peak_rss_gb()
        cuda = _cuda_in_use()
        if cuda is not None:
            out["peak_gpu_gb"] = round(cuda.max_memory_allocated() / 1024**3, 3)


def _cuda_in_use():
    """``torch.cuda`` when this process has initialised CUDA, else None (never initialises it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _stage_wall_s(info: dict) -> float:
    """What computing a stage's entry took: the cache's time over its attempts, or a resumed
    training's own running total where that is larger (attempts from before the cache counted
    them; a training stage's ``wall_time_s`` spans every resumed segment)."""
    wall = float(info.get("wall_s", 0.0))
    if info.get("resumed_from_step") is not None:
        wall = max(wall, float(info.get("wall_time_s") or 0.0))
    return wall


def run_stages(job: Job, ids: dict[str, StageId]) -> dict[str, dict]:
    """Each requested stage in order, from the cache or run; returns its cost row."""
    costs: dict[str, dict] = {}
    for stage in STAGE_OBJECTS:
        name = stage.name
        if name not in job.stages:
            continue
        with stage_memory() as peak:
            job.dirs[name] = job.cache.get_or_run(
                name,
                job.keys[name],
                lambda work, stage=stage: stage.run(job, work),
                identity=_entry_record(ids[name]),
            )
        info = read_json(job.dirs[name] / "stage.json")
        costs[name] = {
            "wall_s": round(_stage_wall_s(info), 2),
            "tokens": int(info.get("tokens") or info.get("tokens_processed") or 0),
            "cached": name in job.cache.hits,
            "device": info.get("device"),  # where the stage's model ran (None: no model)
            **peak,
        }
        if job.tracker is not None:
            job.tracker.log(
                {f"{name}/wall_s": costs[name]["wall_s"], f"{name}/tokens": costs[name]["tokens"]}
            )
    return costs


def _finish(job: Job, metrics: dict, run_dir: Path) -> None:
    """Export the selection (when configured), write ``metrics.json`` and report to the tracker."""
    if "select" in job.dirs:  # the selected records as data (domain=custom, grads-select)
        from grads.export import maybe_export

        metrics |= maybe_export(job.cfg, job.dirs["select"], run_dir)
    write_json(run_dir / "metrics.json", metrics)
    if job.tracker is not None:
        job.tracker.summary(_flat(metrics))
        if "select" in job.dirs:
            job.tracker.log_image("selection", job.dirs["select"] / "selection.png")
        job.tracker.log_table("metrics", [_flat(metrics)])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _assemble(job: Job, costs: dict, wall: float) -> dict:
    """The job's ``metrics.json``: identity, headline metrics, costs and where artefacts live."""
    from grads.selectors.balance import method_name

    cfg, keys, dirs, cache = job.cfg, job.keys, job.dirs, job.cache
    # What choosing the subset costs: warm-up + features + select, or the select stage alone for
    # selectors that need no model (random, full), although the pipeline shares features with them.
    cost_stages = ("select",) if job.selector.model_free else ("warmup", "features", "select")
    sel_cost = sum(costs.get(s, {}).get("wall_s", 0.0) for s in cost_stages)
    m: dict[str, Any] = {
        "domain": cfg["domain"]["name"],
        "selector": method_name(cfg),
        "budget": cfg["budget"].get("name"),
        "model": cfg["model"]["name"],
        "seed": cfg["seed"],
        "trainer_mode": cfg.get("trainer", {}).get("mode"),
        "group": cfg.get("group"),
        "stages": list(dirs),
        "keys": {s: keys[s] for s in dirs},
        "artefacts": {s: str(p) for s, p in dirs.items()},
        "cost": costs,
        "selection_cost_s": round(sel_cost, 2),
        "wall_s": round(wall, 2),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }
    if "features" in dirs and (dirs["features"] / "data.json").exists():
        m["data"] = read_json(dirs["features"] / "data.json")
    if "select" in dirs:
        sel = read_json(dirs["select"] / "selection.json")
        m["n_pool"], m["n_selected"] = sel.get("pool_size"), sel.get("selected")
        m["selection"] = {k: v for k, v in sel.items() if isinstance(v, int | float | str | None)}
    if "evaluate" in dirs:
        from grads.evaluation.metrics import headline_keys

        ev = read_json(dirs["evaluate"] / "metrics.json")
        m.update({k: ev[k] for k in headline_keys() if k in ev})
        m["tasks"] = ev.get("tasks", {})
        m["loss_tasks"] = ev.get("loss_tasks", {})
        # per-item results of the tuned and the base model: the collector pairs methods on them
        m["items"] = ev.get("items", {})
    return m


def _print_summary(m: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"grads: {m['domain']} / {m['selector']} / {m['budget']} / seed {m['seed']}")
    gpu = any(c.get("peak_gpu_gb") is not None for c in m["cost"].values())
    for col in ("stage", "wall s", "tokens", "cached", "peak RSS GB", *(["peak GPU GB"] * gpu)):
        t.add_column(col)
    for stage, c in m["cost"].items():
        row = [stage, f"{c['wall_s']:.1f}", str(c["tokens"]), "yes" if c["cached"] else ""]
        row.append(_gb(c.get("peak_rss_gb")))
        if gpu:
            row.append(_gb(c.get("peak_gpu_gb")))
        t.add_row(*row)
    console = Console()
    console.print(t)
    heads = [
        k
        for k in ("n_pool", "n_selected", "domain_acc", "general_acc", "domain_gain", "forgetting")
        if k in m
    ]
    if heads:
        console.print(
            "  ".join(
                f"{k}={m[k]:.4f}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in heads
            )
        )


def _gb(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"
