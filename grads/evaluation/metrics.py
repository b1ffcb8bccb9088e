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


# --------------------------------------------------------------------------------------------------
# Item-level metrics: accuracy, held-out loss, bits per byte, KL as ratios of per-item sums
# --------------------------------------------------------------------------------------------------
LN2 = math.log(2.0)

# Parts of an evaluation (config key of their task list) and the metrics computed from their items:
#   domain / general         accuracy tasks (domain.eval_tasks, eval.general_tasks)
#   domain_loss              eval.domain_loss_tasks   held-out domain SFT samples (grads_heldout)
#   ref                      eval.ref_tasks           reference answers to general instructions
#   text                     eval.text_tasks          plain text, rolling log-likelihood (WikiText-2)
#   kl                       eval.kl_task             KL(base || tuned) on the reference answers
LOSS_PARTS = {"domain_loss": "domain_loss_tasks", "ref": "ref_tasks", "text": "text_tasks"}


class ItemMetric:
    """A metric computed from per-item arrays: the mean over a part's tasks of a ratio of sums.

    For each task (stratum) ``t`` of the part, ``value_t = scale * sum_i w_i num_i / sum_i w_i den_i``
    (``den = 1`` for accuracies; ``w = 1`` unless a group averages its leaves), and the metric is the
    unweighted mean of ``value_t`` over the part's tasks that have the numerator field. So
    ``domain_loss`` is the mean response-token NLL ``sum(nll) / sum(tokens)`` of the held-out split,
    ``*_bpb`` is ``sum(nll) / (ln 2 * sum(bytes))``, and ``domain_acc`` is the mean task accuracy,
    exactly as the headline numbers are computed.
    """

    def __init__(self, name, part, num, den=None, scale=1.0, higher_is_better=True, label=None):
        self.name, self.part, self.num, self.den = name, part, num, den
        self.scale, self.higher_is_better = float(scale), bool(higher_is_better)
        self.label = label or name

    def strata(self, part_items: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """The part's tasks that carry this metric's numerator."""
        return [t for t, d in part_items.items() if self.num in d and len(d[self.num])]

    def arrays(self, items: Mapping[str, Any]) -> tuple[list[float], list[float]]:
        """``(w * num, w * den)`` per item of one task."""
        num = items[self.num]
        den = items[self.den] if self.den else [1.0] * len(num)
        w = items.get("w") or [1.0] * len(num)
        return [a * b for a, b in zip(w, num)], [a * b for a, b in zip(w, den)]

    def value(self, part_items: Mapping[str, Mapping[str, Any]]) -> float | None:
        """The metric over one model's items of its part (None when no task has it)."""
        vals = []
        for task in self.strata(part_items):
            num, den = self.arrays(part_items[task])
            vals.append(self.scale * sum(num) / sum(den))
        return sum(vals) / len(vals) if vals else None


ITEM_METRICS: dict[str, ItemMetric] = {
    m.name: m
    for m in (
        ItemMetric("domain_acc", "domain", "acc", label="Domain acc"),
        ItemMetric("general_acc", "general", "acc", label="General acc"),
        ItemMetric("general_acc_norm", "general", "acc_norm", label="General acc_norm"),
        ItemMetric("domain_loss", "domain_loss", "nll", "tokens", 1.0, False, "Domain loss"),
        ItemMetric("domain_bpb", "domain_loss", "nll", "bytes", 1 / LN2, False, "Domain bpb"),
        ItemMetric("ref_nll", "ref", "nll", "tokens", 1.0, False, "Ref NLL"),
        ItemMetric("ref_bpb", "ref", "nll", "bytes", 1 / LN2, False, "Ref bpb"),
        ItemMetric("text_bpb", "text", "nll", "bytes", 1 / LN2, False, "Text bpb"),
        ItemMetric("general_kl", "kl", "kl", "tokens", 1.0, False, "KL(base‖tuned)"),
    )
}
# tuned-vs-base differences written to metrics.json, oriented so that larger = "more of it":
# *_gain: learned (domain), *_increase / forgetting_*: forgotten (general).
GAIN_NAMES = {
    "domain_loss": "domain_loss_gain",
    "domain_bpb": "domain_bpb_gain",
    "ref_nll": "ref_nll_increase",
    "ref_bpb": "ref_bpb_increase",
    "text_bpb": "text_bpb_increase",
    "general_acc_norm": "forgetting_acc_norm",
}


def ratio_stderr(num: list[float], den: list[float]) -> float | None:
    """Standard error of ``sum(num) / sum(den)`` over items (delta method), None below 2 items."""
    n = len(num)
    if n < 2 or not sum(den):
        return None
    r, dbar = sum(num) / sum(den), sum(den) / n
    z = [(a - r * b) / dbar for a, b in zip(num, den)]
    mean = sum(z) / n
    return math.sqrt(sum((x - mean) ** 2 for x in z) / (n - 1) / n)


def item_summary(items: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float | None]:
    """Every :data:`ITEM_METRICS` value computable from one model's items (``part -> task -> arrays``).

    Single-task continuous metrics also get ``<name>_stderr`` (item-level, delta method).
    """
    out: dict[str, float | None] = {}
    for name, metric in ITEM_METRICS.items():
        part = items.get(metric.part) or {}
        value = metric.value(part)
        if value is None:
            continue
        out[name] = value
        strata = metric.strata(part)
        if metric.den and len(strata) == 1:
            se = ratio_stderr(*metric.arrays(part[strata[0]]))
            out[f"{name}_stderr"] = None if se is None else metric.scale * se
    return out


def item_gains(tuned: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float]:
    """The :data:`GAIN_NAMES` differences between two :func:`item_summary` results."""
    out = {}
    for name, gain in GAIN_NAMES.items():
        if tuned.get(name) is None or base.get(name) is None:
            continue
        better_lower = not ITEM_METRICS[name].higher_is_better
        learned = name.startswith("domain")
        diff = tuned[name] - base[name]
        # domain: improvement is positive; general: deterioration is positive
        out[gain] = (
            (-diff if better_lower else diff) if learned else (diff if better_lower else -diff)
        )
    return out


def headline_keys() -> list[str]:
    """The scalar keys of the evaluate stage's metrics.json that a run's metrics.json repeats."""
    keys = ["domain_acc", "general_acc", "domain_gain", "forgetting"]
    keys += ["base_domain_acc", "base_general_acc"]
    for name in ITEM_METRICS:
        if name not in ("domain_acc", "general_acc"):
            keys += [name, f"base_{name}"]
    return keys + list(GAIN_NAMES.values()) + ["suite"]
