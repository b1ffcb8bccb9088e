"""Evaluation entry points: :func:`evaluate` (one model) and the pipeline stage :func:`run_evaluate`.

The stage evaluates the fine-tuned model, gets the *base* model's results on the same tasks from a
JSON cache (computing them once with ``load_base()`` on a miss), measures KL(base || tuned) on the
reference answers (:mod:`grads.evaluation.kl`; this needs the base model every time), and writes
``metrics.json``: per-task scores, the accuracy summaries (``domain_acc`` / ``general_acc``,
``domain_gain`` / ``forgetting``), the continuous ones (``domain_loss``, ``domain_bpb`` and their
``_gain``, ``ref_nll``, ``ref_bpb``, ``text_bpb`` and their ``_increase``, ``general_kl``,
``general_acc_norm``; formulas in :mod:`grads.evaluation.metrics`) and the per-item arrays of both
models (``items``), which the collector pairs across methods.

Base cache: ``<paths.cache_dir>/eval_base/<key>.json``, one entry per part (domain, general,
domain_loss, ref, text), so the three domains share one base evaluation of the general parts. The
key (:func:`grads.evaluation.identity.base_eval_identity`) hashes the model config and weights, the suite name,
the part's task list, the per-task document counts, few-shot / chat-template / system-prompt
settings, the seed and the content of the task files and of the data files they read, generated
ones included (synthetic data, held-out split); no path, so moving the cache or the data keeps
the entries.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grads.config_access import as_dict
from grads.evaluation.items import gather, public
from grads.evaluation.lm_eval_run import run_lm_eval
from grads.evaluation.metrics import compare, item_gains, item_summary, summarise, task_scores
from grads.evaluation.plan import Plan, prepare
from grads.evaluation.settings import eval_settings, part_lists

log = logging.getLogger(__name__)

# 2: content of task and data files instead of their paths; 3: per-item results and the
# log-likelihood parts
BASE_CACHE_VERSION = 3
ACC_PARTS = ("domain", "general")


def _scores(plan: Plan, results: dict, names: list[str]) -> tuple[dict, dict]:
    """``(top-level scores, leaf scores)`` for ``names``, with document counts from the plan."""
    counts = {n: sum(plan.limits[leaf] for leaf in plan.leaves[n]) for n in names}
    leaves = [leaf for n in names for leaf in plan.leaves[n] if leaf not in names]
    counts |= {leaf: plan.limits[leaf] for leaf in leaves}
    return task_scores(results, names, counts), task_scores(results, leaves, counts)


def _part_items(plan: Plan, items: dict, names: list[str]) -> dict[str, dict]:
    """Requested name -> its leaves' items (see :func:`grads.evaluation.items.gather`)."""
    return {n: gather(items, plan.leaves[n], plan.size_weighted.get(n, True)) for n in names}


def _evaluate_plan(plan: Plan, model: Any, tokenizer: Any, ev: dict, parts: dict) -> dict:
    names = [n for ns in parts.values() for n in ns]
    t0 = time.perf_counter()
    results = run_lm_eval(plan, model, tokenizer, ev, names)
    wall = time.perf_counter() - t0
    acc_names = [n for p in ACC_PARTS for n in parts.get(p, [])]
    scores, subtasks = _scores(plan, results, acc_names)
    items = {p: _part_items(plan, results["items"], ns) for p, ns in parts.items() if ns}
    return {
        "tasks": scores,
        "subtasks": subtasks,
        "loss_tasks": _loss_scores(results, parts),
        "items": items,
        **summarise(scores, parts.get("domain", []), parts.get("general", []), ev["metric"]),
        "n_items": sum(plan.limits[leaf] for n in names for leaf in plan.leaves[n]),
        "wall_s": round(wall, 2),
    }


def _loss_scores(results: dict, parts: dict) -> dict[str, dict]:
    """lm-eval's own aggregate per log-likelihood task (bits per byte, word perplexity)."""
    out = {}
    for part, names in parts.items():
        if part in ACC_PARTS:
            continue
        for n in names:
            row = results["results"].get(n) or {}
            out[n] = {
                k.split(",")[0]: v
                for k, v in row.items()
                if k.endswith(",none") and "stderr" not in k and isinstance(v, int | float)
            }
    return out


def evaluate(
    model: Any, tokenizer: Any, cfg: dict, tasks_domain: list[str], tasks_general: list[str]
) -> dict:
    """Evaluate an in-memory model on domain and general accuracy tasks with lm-eval.

    Args:
        model: a ``transformers`` causal LM (kept on its device; switched to eval mode meanwhile).
        tokenizer: its tokenizer.
        cfg: the resolved run config (uses ``eval``, ``paths`` and, for synthetic tasks, ``domain``).
        tasks_domain: domain task/group names (any ``grads_*`` or lm-eval built-in name).
        tasks_general: general-ability task/group names.

    Returns:
        ``{"tasks": {name: {acc, acc_stderr, [acc_norm, acc_norm_stderr], n}}, "subtasks": {...},
        "items", "domain_acc", "domain_acc_stderr", "general_acc", "general_acc_stderr",
        "n_items", "wall_s"}``.

    Raises:
        TaskConfigError: before the model is used, if a task cannot be loaded.
    """
    cfg = as_dict(cfg)
    ev = eval_settings(cfg)
    domain, general = list(tasks_domain), [t for t in tasks_general if t not in tasks_domain]
    plan = prepare(cfg, domain + general)
    return _evaluate_plan(plan, model, tokenizer, ev, {"domain": domain, "general": general})


# --------------------------------------------------------------------------------------------------
# Base-model cache
# --------------------------------------------------------------------------------------------------
def base_cache_key(cfg: dict, plan: Plan, names: list[str]) -> tuple[str, dict]:
    """``(key, identity)`` of the base model's results on ``names`` (see the module docstring)."""
    from grads.evaluation.identity import base_eval_identity
    from grads.hashing import digest

    identity = base_eval_identity(cfg, plan, names, BASE_CACHE_VERSION)
    if any(set(plan.leaves[n]) & plan.chat for n in names):  # chat-formatted parts (reference NLL)
        identity |= {
            "apply_chat_template": True,
            "fewshot_as_multiturn": False,
            "system_instruction": plan.chat_system,
        }
    return digest(identity), identity


def _cache_path(cfg: dict, key: str) -> Path:
    cache_dir = (as_dict(cfg).get("paths") or {}).get("cache_dir") or "outputs/cache"
    return Path(str(cache_dir)) / "eval_base" / f"{key}.json"


def _read_entry(path: Path, names: list[str]) -> dict | None:
    from grads.io import read_json

    if not path.exists():
        return None
    try:
        entry = read_json(path)
    except (OSError, ValueError) as exc:
        log.warning("unreadable base-eval cache %s (%s): recomputing", path, exc)
        return None
    return entry if set(entry.get("items", {})) >= set(names) else None


class LazyModel:
    """``load()`` called at most once, on first use; :meth:`release` drops the reference."""

    def __init__(self, load: Callable[[], tuple[Any, Any]]):
        self._load, self._pair = load, None

    def get(self) -> tuple[Any, Any]:
        if self._pair is None:
            self._pair = self._load()
        return self._pair

    def release(self) -> None:
        self._pair = None
        gc.collect()


def base_results(
    cfg: dict, plan: Plan, parts: dict[str, list[str]], load_base: Callable[[], tuple[Any, Any]]
) -> tuple[dict, dict, dict, dict]:
    """The base model's results on each part (e.g. domain, general, ref), cached as JSON.

    ``load_base`` is called at most once, and only if some part is not cached.

    Returns:
        ``(scores, subtasks, items, info)``: accuracy scores by name over all parts, leaf scores,
        per part ``{name: items}``, and per part ``{key, cache: "hit"|"miss", path, wall_s}``.
    """
    from grads.io import write_json

    ev = eval_settings(cfg)
    scores: dict[str, dict] = {}
    subtasks: dict[str, dict] = {}
    items: dict[str, dict] = {}
    info: dict[str, dict] = {}
    missing: dict[str, tuple[str, dict, Path]] = {}
    for part, names in parts.items():
        if not names:
            continue
        key, identity = base_cache_key(cfg, plan, names)
        path = _cache_path(cfg, key)
        entry = _read_entry(path, names)
        if entry is None:
            missing[part] = (key, identity, path)
            continue
        scores |= entry.get("tasks", {})
        subtasks |= entry.get("subtasks", {})
        items[part] = entry["items"]
        info[part] = {"key": key, "cache": "hit", "path": str(path), "wall_s": entry.get("wall_s")}
    if not missing:
        return scores, subtasks, items, info
    log.info("base-model evaluation not cached for %s: loading the base model", list(missing))
    model, tokenizer = load_base()
    todo = {part: parts[part] for part in missing}
    out = _evaluate_plan(plan, model, tokenizer, ev, todo)
    for part, (key, identity, path) in missing.items():
        part_scores = {n: out["tasks"][n] for n in parts[part] if n in out["tasks"]}
        leaves = {leaf for n in parts[part] for leaf in plan.leaves[n]}
        part_sub = {k: v for k, v in out["subtasks"].items() if k in leaves}
        part_items = public(out["items"][part])
        write_json(
            path,
            {
                "identity": identity,
                "tasks": part_scores,
                "subtasks": part_sub,
                "loss_tasks": {
                    n: out["loss_tasks"][n] for n in parts[part] if n in out["loss_tasks"]
                },
                "items": part_items,
                "wall_s": out["wall_s"],  # one run for all missing parts
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        scores |= part_scores
        subtasks |= part_sub
        items[part] = part_items
        info[part] = {"key": key, "cache": "miss", "path": str(path), "wall_s": out["wall_s"]}
    return scores, subtasks, items, info


# --------------------------------------------------------------------------------------------------
# KL(base || tuned)
# --------------------------------------------------------------------------------------------------
def kl_part(
    ev: dict, items: dict, tuned: Any, base: LazyModel, tokenizer: Any
) -> tuple[dict | None, float | None]:
    """Per-item KL(base || tuned) on the first ``eval.kl_limit`` items of ``eval.kl_task``.

    Returns:
        ``({kl_task: {keys, kl, tokens, nll_base, nll_tuned}}, gap)``: the ``kl`` part and the
        largest difference between the tuned NLL of this pass and lm-eval's (a consistency check);
        ``(None, None)`` when ``eval.kl_task`` is not set.
    """
    from grads.evaluation.kl import kl_items

    task = ev["kl_task"]
    if not task:
        return None, None
    src = next((p[task] for p in items.values() if task in p), None)
    if src is None or "_enc" not in src:
        raise ValueError(f"eval.kl_task={task!r} has no log-likelihood items to score")
    n = len(src["keys"]) if ev["kl_limit"] is None else min(int(ev["kl_limit"]), len(src["keys"]))
    base_model, _ = base.get()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_len = int(getattr(tuned.config, "max_position_embeddings", 2048) or 2048)
    out = kl_items(base_model, tuned, src["_enc"][:n], batch_size=4, max_length=max_len, pad_id=pad)
    # the tuned NLL of the same tokens must equal lm-eval's: a check that both saw one sequence
    gap = max((abs(a - b) for a, b in zip(out["nll_tuned"], src["nll"][:n])), default=0.0)
    if gap > 1e-3 * max(1.0, max(src["nll"][:n], default=1.0)):
        log.warning("KL pass and lm-eval disagree on the tuned NLL by up to %.4g nats", gap)
    return {task: {"keys": src["keys"][:n], **out}}, gap


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

    Task lists: :func:`grads.evaluation.settings.part_lists` (``domain.eval_tasks``,
    ``eval.general_tasks`` + the domain's ``eval_tasks_general``, ``eval.domain_loss_tasks``,
    ``eval.ref_tasks``, ``eval.text_tasks``; KL on ``eval.kl_task``).

    Args:
        cfg: the resolved run config.
        model: the fine-tuned model.
        tokenizer: its tokenizer.
        out_dir: where ``metrics.json`` is written.
        load_base: returns ``(base model, tokenizer)``; called on a base-cache miss and for KL.

    Returns:
        The ``metrics.json`` content (see the module docstring); ``{"skipped": True}`` when
        ``eval.enabled`` is false.
    """
    from grads.io import write_json

    cfg = as_dict(cfg)
    ev = eval_settings(cfg)
    out_path = Path(out_dir) / "metrics.json"
    parts = {p: ns for p, ns in part_lists(cfg).items() if ns}
    if not ev["enabled"] or not parts:
        reason = "eval.enabled=false" if not ev["enabled"] else "no evaluation tasks"
        metrics = {"skipped": True, "suite": ev["name"], "reason": reason}
        write_json(out_path, metrics)
        return metrics

    t0 = time.perf_counter()
    plan = prepare(cfg, [n for ns in parts.values() for n in ns])
    tuned = _evaluate_plan(plan, model, tokenizer, ev, parts)
    base = LazyModel(load_base)
    try:
        base_scores, base_sub, base_items, cache_info = base_results(cfg, plan, parts, base.get)
        t_kl = time.perf_counter()
        kl, kl_gap = kl_part(ev, tuned["items"], model, base, tokenizer)
        kl_wall = round(time.perf_counter() - t_kl, 2)
    finally:
        base.release()
    if kl is not None:
        tuned["items"]["kl"] = kl
    metrics = _stage_metrics(cfg, ev, parts, tuned, base_scores, base_sub, base_items)
    metrics |= {
        "base_cache": cache_info,
        "n_items": tuned["n_items"],
        "eval_wall_s": tuned["wall_s"],
        "kl_wall_s": kl_wall if kl is not None else None,
        "kl_nll_gap": kl_gap,
        "wall_s": round(time.perf_counter() - t0, 2),
        # wall times on a shared machine mean little without the load they ran under
        "host_load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    write_json(out_path, metrics)
    return metrics


def _stage_metrics(cfg, ev, parts, tuned, base_scores, base_sub, base_items) -> dict:
    domain, general = parts.get("domain", []), parts.get("general", [])
    base = summarise(base_scores, domain, general, ev["metric"])
    t_items = {p: public(ps) for p, ps in tuned["items"].items()}
    t_sum, b_sum = item_summary(t_items), item_summary(base_items)
    continuous = {k: v for k, v in t_sum.items() if k not in ("domain_acc", "general_acc")}
    base_cont = {f"base_{k}": v for k, v in b_sum.items() if k not in ("domain_acc", "general_acc")}
    return {
        "suite": ev["name"],
        "metric": ev["metric"],
        "domain_tasks": domain,
        "general_tasks": general,
        "loss_parts": {p: ns for p, ns in parts.items() if p not in ACC_PARTS},
        "domain_acc": tuned["domain_acc"],
        "domain_acc_stderr": tuned["domain_acc_stderr"],
        "general_acc": tuned["general_acc"],
        "general_acc_stderr": tuned["general_acc_stderr"],
        "base_domain_acc": base["domain_acc"],
        "base_domain_acc_stderr": base["domain_acc_stderr"],
        "base_general_acc": base["general_acc"],
        "base_general_acc_stderr": base["general_acc_stderr"],
        **compare(tuned, base),
        **continuous,
        **base_cont,
        **item_gains(t_sum, b_sum),
        "tasks": tuned["tasks"],
        "base_tasks": {n: base_scores[n] for n in domain + general if n in base_scores},
        "loss_tasks": tuned["loss_tasks"],
        "subtasks": tuned["subtasks"],
        "base_subtasks": base_sub,
        "items": {"tuned": t_items, "base": base_items},
    }
