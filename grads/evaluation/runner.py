"""Evaluation entry points: :func:`evaluate` (one model) and the pipeline stage :func:`run_evaluate`.

The stage evaluates the fine-tuned model, gets the *base* model's scores on the same tasks from a
JSON cache (computing them once with ``load_base()`` on a miss), and writes ``metrics.json`` with
per-task scores, ``domain_acc`` / ``general_acc`` and ``domain_gain`` / ``forgetting`` (formulas in
:mod:`grads.evaluation.metrics`).

Base cache: ``<paths.cache_dir>/eval_base/<key>.json``, one entry per task list (domain tasks and
general tasks separately, so the three domains share one base evaluation of the general suite). The
key (:func:`grads.identity.base_eval_identity`) hashes the model config and weights, the suite name,
the task list, the per-task document counts, few-shot / chat-template / system-prompt settings, the
seed and the content of the task files and of the data files they read (no path: moving the cache
or the data keeps the entries).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grads.evaluation.harness import (
    Plan,
    as_dict,
    eval_settings,
    prepare,
    run_lm_eval,
    task_lists,
)
from grads.evaluation.metrics import compare, summarise, task_scores

log = logging.getLogger(__name__)

BASE_CACHE_VERSION = 2  # 2: content of task and data files instead of their paths


def _scores(plan: Plan, results: dict, names: list[str]) -> tuple[dict, dict]:
    """``(top-level scores, leaf scores)`` for ``names``, with document counts from the plan."""
    counts = {n: sum(plan.limits[leaf] for leaf in plan.leaves[n]) for n in names}
    leaves = [leaf for n in names for leaf in plan.leaves[n] if leaf not in names]
    counts |= {leaf: plan.limits[leaf] for leaf in leaves}
    return task_scores(results, names, counts), task_scores(results, leaves, counts)


def _evaluate_plan(
    plan: Plan, model: Any, tokenizer: Any, ev: dict, domain: list[str], general: list[str]
) -> dict:
    names = domain + general
    t0 = time.perf_counter()
    results = run_lm_eval(plan, model, tokenizer, ev, names)
    wall = time.perf_counter() - t0
    scores, subtasks = _scores(plan, results, names)
    out = {
        "tasks": scores,
        "subtasks": subtasks,
        **summarise(scores, domain, general, ev["metric"]),
        "n_items": sum(plan.limits[leaf] for n in names for leaf in plan.leaves[n]),
        "wall_s": round(wall, 2),
    }
    return out


def evaluate(
    model: Any, tokenizer: Any, cfg: dict, tasks_domain: list[str], tasks_general: list[str]
) -> dict:
    """Evaluate an in-memory model on domain and general tasks with lm-eval.

    Args:
        model: a ``transformers`` causal LM (kept on its device; switched to eval mode meanwhile).
        tokenizer: its tokenizer.
        cfg: the resolved run config (uses ``eval``, ``paths`` and, for synthetic tasks, ``domain``).
        tasks_domain: domain task/group names (any ``grads_*`` or lm-eval built-in name).
        tasks_general: general-ability task/group names.

    Returns:
        ``{"tasks": {name: {acc, acc_stderr, [acc_norm, acc_norm_stderr], n}}, "subtasks": {...},
        "domain_acc", "domain_acc_stderr", "general_acc", "general_acc_stderr", "n_items",
        "wall_s"}``.

    Raises:
        TaskConfigError: before the model is used, if a task cannot be loaded.
    """
    cfg = as_dict(cfg)
    ev = eval_settings(cfg)
    domain, general = list(tasks_domain), [t for t in tasks_general if t not in tasks_domain]
    plan = prepare(cfg, domain + general)
    return _evaluate_plan(plan, model, tokenizer, ev, domain, general)


# --------------------------------------------------------------------------------------------------
# Base-model cache
# --------------------------------------------------------------------------------------------------
def base_cache_key(cfg: dict, plan: Plan, names: list[str]) -> tuple[str, dict]:
    """``(key, identity)`` of the base model's results on ``names`` (see the module docstring)."""
    from grads.identity import base_eval_identity, digest

    identity = base_eval_identity(cfg, plan, names, BASE_CACHE_VERSION)
    return digest(identity), identity


def _cache_path(cfg: dict, key: str) -> Path:
    cache_dir = (as_dict(cfg).get("paths") or {}).get("cache_dir") or "outputs/cache"
    return Path(str(cache_dir)) / "eval_base" / f"{key}.json"


def base_results(
    cfg: dict, plan: Plan, parts: dict[str, list[str]], load_base: Callable[[], tuple[Any, Any]]
) -> tuple[dict, dict, dict]:
    """The base model's scores on each part (e.g. domain, general), cached as JSON.

    ``load_base`` is called at most once, and only if some part is not cached.

    Returns:
        ``(scores, subtasks, info)``: name -> scores over all parts, leaf scores, and per part
        ``{key, cache: "hit"|"miss", path, wall_s}``.
    """
    from grads.io import read_json, write_json

    ev = eval_settings(cfg)
    scores: dict[str, dict] = {}
    subtasks: dict[str, dict] = {}
    info: dict[str, dict] = {}
    missing: dict[str, tuple[str, dict, Path]] = {}
    for part, names in parts.items():
        if not names:
            continue
        key, identity = base_cache_key(cfg, plan, names)
        path = _cache_path(cfg, key)
        entry = None
        if path.exists():
            try:
                entry = read_json(path)
            except (OSError, ValueError) as exc:
                log.warning("unreadable base-eval cache %s (%s): recomputing", path, exc)
        if entry is not None and set(entry.get("tasks", {})) >= set(names):
            scores |= entry["tasks"]
            subtasks |= entry.get("subtasks", {})
            info[part] = {
                "key": key,
                "cache": "hit",
                "path": str(path),
                "wall_s": entry.get("wall_s"),
            }
        else:
            missing[part] = (key, identity, path)
    if missing:
        log.info("base-model evaluation not cached for %s: loading the base model", list(missing))
        model, tokenizer = load_base()
        try:
            names = [n for part in missing for n in parts[part]]
            t0 = time.perf_counter()
            results = run_lm_eval(plan, model, tokenizer, ev, names)
            wall = round(time.perf_counter() - t0, 2)  # one run for all missing parts
        finally:
            del model, tokenizer
            gc.collect()
        for part, (key, identity, path) in missing.items():
            part_scores, part_sub = _scores(plan, results, parts[part])
            write_json(
                path,
                {
                    "identity": identity,
                    "tasks": part_scores,
                    "subtasks": part_sub,
                    "wall_s": wall,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
            scores |= part_scores
            subtasks |= part_sub
            info[part] = {"key": key, "cache": "miss", "path": str(path), "wall_s": wall}
    return scores, subtasks, info


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def run_evaluate(
    cfg: dict,
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    load_base: Callable[[], tuple[Any, Any]],
) -> dict:
    """Pipeline stage: evaluate the tuned model and compare it with the base model.

    Task lists: ``cfg.domain.eval_tasks`` and ``cfg.eval.general_tasks`` (+ the domain's
    ``eval_tasks_general``); see :func:`grads.evaluation.harness.task_lists`.

    Args:
        cfg: the resolved run config.
        model: the fine-tuned model.
        tokenizer: its tokenizer.
        out_dir: where ``metrics.json`` is written.
        load_base: returns ``(base model, tokenizer)``; called only on a base-cache miss.

    Returns:
        The ``metrics.json`` content: ``domain_acc``, ``general_acc`` (+ ``_stderr``),
        ``base_domain_acc``, ``base_general_acc``, ``domain_gain``, ``forgetting``, ``tasks``
        (tuned, per requested name), ``base_tasks``, ``subtasks``, ``base_subtasks``, ``base_cache``,
        ``suite``, ``metric``, ``domain_tasks``, ``general_tasks``, ``n_items``, ``wall_s``.
        ``{"skipped": True}`` when ``eval.enabled`` is false.
    """
    from grads.io import write_json

    cfg = as_dict(cfg)
    ev = eval_settings(cfg)
    out_path = Path(out_dir) / "metrics.json"
    domain, general = task_lists(cfg)
    if not ev["enabled"] or not (domain or general):
        metrics = {
            "skipped": True,
            "suite": ev["name"],
            "reason": "eval.enabled=false" if not ev["enabled"] else "no evaluation tasks",
        }
        write_json(out_path, metrics)
        return metrics

    t0 = time.perf_counter()
    plan = prepare(cfg, domain + general)
    tuned = _evaluate_plan(plan, model, tokenizer, ev, domain, general)
    base_scores, base_sub, cache_info = base_results(
        cfg, plan, {"domain": domain, "general": general}, load_base
    )
    base = summarise(base_scores, domain, general, ev["metric"])
    metrics = {
        "suite": ev["name"],
        "metric": ev["metric"],
        "domain_tasks": domain,
        "general_tasks": general,
        "domain_acc": tuned["domain_acc"],
        "domain_acc_stderr": tuned["domain_acc_stderr"],
        "general_acc": tuned["general_acc"],
        "general_acc_stderr": tuned["general_acc_stderr"],
        "base_domain_acc": base["domain_acc"],
        "base_domain_acc_stderr": base["domain_acc_stderr"],
        "base_general_acc": base["general_acc"],
        "base_general_acc_stderr": base["general_acc_stderr"],
        **compare(tuned, base),
        "tasks": tuned["tasks"],
        "base_tasks": {n: base_scores[n] for n in domain + general},
        "subtasks": tuned["subtasks"],
        "base_subtasks": base_sub,
        "base_cache": cache_info,
        "n_items": tuned["n_items"],
        "eval_wall_s": tuned["wall_s"],
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    write_json(out_path, metrics)
    return metrics
