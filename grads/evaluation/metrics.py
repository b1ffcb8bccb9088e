"""Metric arithmetic: per-task scores from lm-eval results, domain/general means, gain and forgetting.

Pure functions over dicts (no lm-eval import), so they are tested directly. With ``acc_d`` the
primary metric (``eval.metric``: ``acc`` or ``acc_norm``) of task ``d``:

    domain_acc  = mean_{d in domain tasks}  acc_d          general_acc = mean_{g in general tasks} acc_g
    domain_gain = domain_acc(tuned) - domain_acc(base)     ("learn more": higher is better)
    forgetting  = general_acc(base) - general_acc(tuned)   ("forget less": lower is better)

A group (e.g. ``grads_mmlu_medical``) counts as one task with lm-eval's aggregate of its subtasks.
The standard error of a mean of k independent task accuracies is ``sqrt(sum se_d^2) / k``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

METRICS = ("acc", "acc_norm")


def _num(value: Any) -> float | None:
    """A float, or None for lm-eval's ``"N/A"`` / missing / NaN."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def task_scores(
    results: Mapping[str, Any], names: Iterable[str], counts: Mapping[str, int] | None = None
) -> dict[str, dict]:
    """Per-name ``{acc, acc_stderr, acc_norm, acc_norm_stderr, n}`` from a ``simple_evaluate`` result.

    Args:
        results: lm-eval's output (``results`` holds tasks and groups, metric keys ``"acc,none"``).
        names: task or group names to extract.
        counts: name -> number of evaluated documents (else lm-eval's ``n-samples`` / ``sample_len``).

    Returns:
        name -> scores; ``acc_norm`` keys only where the task reports it.
    """
    table = results["results"]
    n_samples = results.get("n-samples") or {}
    out: dict[str, dict] = {}
    for name in names:
        if name not in table:
            raise KeyError(f"no results for task '{name}' (have {sorted(table)})")
        row = table[name]
        entry: dict[str, Any] = {}
        if counts is not None and name in counts:
            n = int(counts[name])
        elif name in n_samples:
            n = int(n_samples[name].get("effective", 0))
        else:
            n = int(row.get("sample_len", 0) or 0)
        for metric in METRICS:
            if f"{metric},none" in row:
                value = _num(row[f"{metric},none"])
                err = _num(row.get(f"{metric}_stderr,none"))
                if err is None and value is not None and n >= 2:
                    # lm-eval gives a group "N/A" when a subtask has a single item (e.g. one MMLU
                    # question per subject): use the stderr of the pooled proportion instead.
                    err = binomial_stderr(value, n)
                entry[metric], entry[f"{metric}_stderr"] = value, err
        entry["n"] = n
        out[name] = entry
    return out


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a proportion over ``n`` items, as lm-eval's ``mean_stderr`` computes it.

    ``sqrt(p (1 - p) / (n - 1))`` (sample standard deviation over sqrt(n)).
    """
    return math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1)) if n >= 2 else float("nan")


def primary(scores: Mapping[str, Any], metric: str = "acc") -> tuple[float | None, float | None]:
    """``(value, stderr)`` of ``metric`` for one task; ``acc_norm`` falls back to ``acc``."""
    if metric not in scores or scores.get(metric) is None:
        metric = "acc"
    return scores.get(metric), scores.get(f"{metric}_stderr")


def mean_score(
    scores: Mapping[str, Mapping[str, Any]], names: Iterable[str], metric: str = "acc"
) -> tuple[float | None, float | None]:
    """Unweighted mean of ``metric`` over ``names`` and its standard error.

    Returns:
        ``(mean, stderr)``; ``(None, None)`` for an empty list; stderr None if any task lacks one.
    """
    values, errors = [], []
    for name in names:
        value, err = primary(scores[name], metric)
        if value is None:
            raise ValueError(f"task '{name}' has no '{metric}' (scores: {dict(scores[name])})")
        values.append(value)
        errors.append(err)
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if any(e is None for e in errors):
        return mean, None
    return mean, math.sqrt(sum(e * e for e in errors)) / len(values)


def summarise(
    scores: Mapping[str, Mapping[str, Any]],
    domain: list[str],
    general: list[str],
    metric: str = "acc",
) -> dict[str, float | None]:
    """``domain_acc`` / ``general_acc`` (and their stderr) of one model."""
    d, d_se = mean_score(scores, domain, metric)
    g, g_se = mean_score(scores, general, metric)
    return {
        "domain_acc": d,
        "domain_acc_stderr": d_se,
        "general_acc": g,
        "general_acc_stderr": g_se,
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def compare(tuned: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """``domain_gain = domain(tuned) - domain(base)``, ``forgetting = general(base) - general(tuned)``.

    Args:
        tuned: :func:`summarise` of the fine-tuned model.
        base: :func:`summarise` of the base model.
    """
    return {
        "domain_gain": _diff(tuned.get("domain_acc"), base.get("domain_acc")),
        "forgetting": _diff(base.get("general_acc"), tuned.get("general_acc")),
    }
