"""The GrADS pipeline: warm-up -> features -> select -> fine-tune -> evaluate, with a stage cache.

Each stage's output lives in a content-addressed folder ``<cache_dir>/<stage>/<key>`` whose key hashes
exactly the part of the resolved config the stage depends on, chained through its inputs' keys::

    warmup   = H(model + weights, pool files' content, data, trainer(warmup))
    features = H(warmup, feature options)
    select   = H(features, selector, budget, seed)          (budget dropped for budget-free selectors)
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

import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from grads.cache import StageCache
from grads.identity import CACHE_VERSION, STAGES, StageId, stage_identities, stage_keys
from grads.io import read_json, read_jsonl, write_json, write_text

__all__ = ["CACHE_VERSION", "STAGES", "StageCache", "StageInterrupted", "run", "stage_keys"]

log = logging.getLogger(__name__)


class StageInterrupted(RuntimeError):
    """A stage stopped before completing; its work folder is kept so the same command resumes."""


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def _load_trained(cfg: dict, train_dir: Path):
    """The model a training stage saved (full weights, or base + LoRA adapter merged)."""
    from grads.training import load_trained

    return load_trained(cfg["model"], train_dir, cache_dir=cfg["paths"]["model_dir"])


def resolve_features_cfg(cfg: dict) -> dict:
    """Resolve ``features.ifd=auto`` (IFD only when the selector needs it) in a copy of ``cfg``."""
    feats = dict(cfg.get("features") or {})
    from hydra.utils import instantiate

    selector = instantiate(cfg["selector"])
    needs = tuple(getattr(selector, "requires", ()) or ())
    if feats.get("ifd", "auto") == "auto":
        feats["ifd"] = "ifd" in needs
    if any("_tok_" in c for c in needs):
        feats["stats"] = True
    from grads.representations import resolve_features_representations

    return {**cfg, "features": resolve_features_representations(cfg, feats, selector)}


def _stage_cfg(cfg: dict, seed: int) -> dict:
    return {**cfg, "seed": int(seed)}


def _train_stage(cfg: dict, use: str, work: Path, ids: list[str] | None, tracker) -> dict:
    from grads.io import read_jsonl as _read_log
    from grads.training import TrainerSettings, train

    procs = TrainerSettings.from_cfg(cfg, use).resolved_procs()
    # In-process training logs each step to the tracker; spawned workers cannot reach it, so their
    # train_log.jsonl is replayed afterwards.
    log_fn = tracker.log if (tracker is not None and procs <= 1) else None
    summary = train(cfg, use, str(work), ids=ids, log_fn=log_fn) or {}
    if summary.get("stopped"):
        raise StageInterrupted(
            f"{use} stopped before completion (stop_after_steps); its checkpoints "
            f"are in {work}: re-run the same command to resume"
        )
    if tracker is not None and procs > 1 and (work / "train_log.jsonl").exists():
        for row in _read_log(work / "train_log.jsonl"):
            tracker.log({f"{use}/{k}": v for k, v in row.items() if k != "step"}, row.get("step"))
    return summary


def run_warmup(cfg: dict, work: Path, tracker=None) -> dict:
    seed = cfg["warmup"].get("seed", cfg["seed"])
    return _train_stage(_stage_cfg(cfg, seed), "warmup", work, None, tracker)


def _features_job(cfg: dict, warmup_dir: str, work: str) -> None:
    from grads.data import load_pool
    from grads.dist import compute_device
    from grads.features import run_features

    model, tokenizer = _load_trained(cfg, Path(warmup_dir))
    # Models load on the CPU; without this move a GPU machine would compute features on the CPU.
    model.to(compute_device())
    pool, data_stats = load_pool(cfg, tokenizer, return_stats=True)
    write_json(Path(work) / "data.json", data_stats)  # bad/filtered/dropped rows -> metrics.json
    run_features(cfg, model, tokenizer, pool, work)
    if (cfg.get("features") or {}).get("representations"):
        from grads.representations import run_stage_passes

        del model
        run_stage_passes(cfg, warmup_dir, pool, work)


def run_features_stage(cfg: dict, work: Path, warmup_dir: Path) -> dict:
    from grads.launch import run_distributed

    if (cfg.get("features") or {}).get("source", "pass") == "warmup":
        from grads.features import features_from_warmup

        # The warm-up recorded the table; the pass runs only for samples it did not train on.
        return features_from_warmup(cfg, warmup_dir, work)
    procs = int(cfg["features"].get("procs") or 1)
    run_distributed("grads.pipeline:_features_job", procs, cfg, str(warmup_dir), str(work))
    info = read_json(work / "features.json")
    if (work / "representations.json").exists():
        info["representations"] = read_json(work / "representations.json")
    return info


def _selector_and_budget(cfg: dict):
    from hydra.utils import instantiate

    return instantiate(cfg["selector"]), instantiate(cfg["budget"])


def run_select_stage(cfg: dict, work: Path, features_dir: Path) -> dict:
    from grads.selectors.stage import run_select

    selector, budget = _selector_and_budget(cfg)
    return (
        run_select(
            selector, budget, str(features_dir / "features.parquet"), str(work), int(cfg["seed"])
        )
        or {}
    )


def run_finetune(cfg: dict, work: Path, select_dir: Path, tracker=None) -> dict:
    ids = [r["id"] for r in read_jsonl(select_dir / "selection.jsonl")]
    return _train_stage(cfg, "finetune", work, ids, tracker)


def run_evaluate_stage(cfg: dict, work: Path, finetune_dir: Path) -> dict:
    from grads.dist import compute_device
    from grads.evaluation import run_evaluate
    from grads.models import load_model

    # lm-eval's HFLM runs an in-memory model where it lies, so both models go to the GPU first.
    device = compute_device()
    model, tokenizer = _load_trained(cfg, finetune_dir)
    model.to(device)

    def load_base():
        base, base_tokenizer = load_model(cfg["model"], cache_dir=cfg["paths"]["model_dir"])
        return base.to(device), base_tokenizer

    out = run_evaluate(cfg, model, tokenizer, str(work), load_base) or {}
    return {**out, "device": str(device)}


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


def _selector_class(cfg: dict):
    from hydra.utils import get_class

    return get_class(cfg["selector"]["_target_"])


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
    if "evaluate" in stages:
        from grads.evaluation import validate_tasks

        validate_tasks(resolved)  # bad task files fail here, before any model is loaded

    from hydra.utils import instantiate

    tracker = instantiate(resolved["logger"]) if resolved.get("logger") else None
    resolved = resolve_features_cfg(resolved)
    ids = stage_identities(resolved, stages)
    keys = {s: i.key for s, i in ids.items()}
    cache = StageCache(resolved["paths"]["cache_dir"])
    dom, sel, bud, model = (
        resolved["domain"]["name"],
        resolved["selector"].get("name", "?"),
        resolved["budget"].get("name", "?"),
        resolved["model"]["name"],
    )
    if tracker is not None:
        tracker.start(
            name=f"{dom}-{sel}-{bud}-s{resolved['seed']}",
            group=str(resolved.get("group")),
            tags=[dom, sel, bud, model, *resolved.get("tags", [])],
            config=resolved,
            run_dir=str(run_dir),
        )
    dirs: dict[str, Path] = {}
    costs: dict[str, dict] = {}

    def need(stage: str) -> Path:
        if stage in dirs:
            return dirs[stage]
        if cache.done(stage, keys[stage]):
            return cache.final(stage, keys[stage])
        raise RuntimeError(
            f"stage '{stage}' has no cached output for this config (key {keys[stage]}); "
            f"add it to stages=[...] (requested: {stages})"
        )

    runners = {
        "warmup": lambda w: run_warmup(resolved, w, tracker),
        "features": lambda w: run_features_stage(resolved, w, need("warmup")),
        "select": lambda w: run_select_stage(resolved, w, need("features")),
        "finetune": lambda w: run_finetune(resolved, w, need("select"), tracker),
        "evaluate": lambda w: run_evaluate_stage(resolved, w, need("finetune")),
    }
    t_run = time.time()
    try:
        for stage in STAGES:
            if stage not in stages:
                continue
            dirs[stage] = cache.get_or_run(
                stage, keys[stage], runners[stage], identity=_entry_record(ids[stage])
            )
            info = read_json(dirs[stage] / "stage.json")
            costs[stage] = {
                "wall_s": round(float(info.get("wall_s", 0.0)), 2),
                "tokens": int(info.get("tokens") or info.get("tokens_processed") or 0),
                "cached": stage in cache.hits,
                "device": info.get("device"),  # where the stage's model ran (None: no model)
            }
            if tracker is not None:
                tracker.log(
                    {
                        f"{stage}/wall_s": costs[stage]["wall_s"],
                        f"{stage}/tokens": costs[stage]["tokens"],
                    }
                )
        metrics = _assemble(resolved, keys, dirs, costs, cache, time.time() - t_run)
        if "select" in dirs:  # the selected records as data (domain=custom, grads-select)
            from grads.export import maybe_export

            metrics |= maybe_export(resolved, dirs["select"], run_dir)
        write_json(run_dir / "metrics.json", metrics)
        if tracker is not None:
            tracker.summary(_flat(metrics))
            if "select" in dirs:
                tracker.log_image("selection", dirs["select"] / "selection.png")
            tracker.log_table("metrics", [_flat(metrics)])
    finally:
        if tracker is not None:
            tracker.finish()
    _print_summary(metrics)
    return metrics


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _assemble(
    cfg: dict, keys: dict, dirs: dict, costs: dict, cache: StageCache, wall: float
) -> dict:
    """The job's ``metrics.json``: identity, headline metrics, costs and where artefacts live."""
    # What choosing the subset costs: warm-up + features + select, or the select stage alone for
    # selectors that need no model (random, full), although the pipeline shares features with them.
    cost_stages = (
        ("select",)
        if getattr(_selector_class(cfg), "model_free", False)
        else ("warmup", "features", "select")
    )
    sel_cost = sum(costs.get(s, {}).get("wall_s", 0.0) for s in cost_stages)
    m: dict[str, Any] = {
        "domain": cfg["domain"]["name"],
        "selector": cfg["selector"].get("name"),
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
    for col in ("stage", "wall s", "tokens", "cached"):
        t.add_column(col)
    for stage, c in m["cost"].items():
        t.add_row(stage, f"{c['wall_s']:.1f}", str(c["tokens"]), "yes" if c["cached"] else "")
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
