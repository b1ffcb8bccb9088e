"""Paired comparisons over items and seeds: bootstrap CIs, noise floor, minimum detectable difference.

Two methods are compared on the *same* evaluation items and seeds (same domain, budget and suite).
For a metric ``f`` (:class:`grads.evaluation.metrics.ItemMetric`: a mean over tasks of a ratio of
per-item sums) the paired difference is

    d = mean_s [ f(A_s) - f(B_s) ]                (s = seeds both methods ran)

and its 95 % CI is a two-level percentile bootstrap: resample the seeds (with replacement), and,
independently, the items of every task (the same item draw for all seeds and both methods, so the
pairing is kept). With one seed only the items are resampled.

Noise floor (:func:`noise_floor`): from k runs of one method (e.g. ``random`` at 5 %) and the base
model, per metric: the std of ``f`` across seeds, the half-width of the paired CI of
(method - base), and the minimum detectable difference of a comparison between two methods with
``k`` seeds each, at 80 % power and two-sided alpha = 0.05:

    MDD = (z_0.975 + z_0.80) * sqrt((2 * sd_seed^2 + se_items^2) / k)

where ``sd_seed`` is the std of ``f`` across seeds (training randomness on fixed items) and
``se_items`` the item-resampling standard error of ``f(run_s) - f(run_s')`` between two seeds
(averaged over seed pairs): the two variance components the collector's bootstrap CI contains.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grads.evaluation.metrics import ITEM_METRICS, ItemMetric

Z_975, Z_80 = 1.959963984540054, 0.8416212335729143
PartItems = Mapping[str, Mapping[str, Any]]  # task -> {"keys": [...], field: [...]}


@dataclass
class Paired:
    """A paired difference ``A - B`` with its bootstrap CI."""

    mean: float
    lo: float
    hi: float
    n_seeds: int
    n_items: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    @property
    def significant(self) -> bool:
        return self.lo > 0 or self.hi < 0


def _arrays(
    runs: Sequence[PartItems], metric: ItemMetric, tasks: list[str], keys: dict[str, list[str]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """task -> ``(num[s, i], den[s, i])`` over the runs, items in ``keys[task]`` order."""
    out = {}
    for task in tasks:
        nums, dens = [], []
        for run in runs:
            items = run[task]
            pos = {k: i for i, k in enumerate(items["keys"])}
            num, den = metric.arrays(items)
            idx = [pos[k] for k in keys[task]]
            nums.append(np.asarray(num, dtype=np.float64)[idx])
            dens.append(np.asarray(den, dtype=np.float64)[idx])
        out[task] = (np.stack(nums), np.stack(dens))
    return out


def common_items(
    runs: Sequence[PartItems], metric: ItemMetric
) -> tuple[list[str], dict[str, list[str]]]:
    """The metric's tasks present in every run, and per task the item keys they all share."""
    tasks = [t for t in metric.strata(runs[0]) if all(t in r and metric.num in r[t] for r in runs)]
    keys = {}
    for t in tasks:
        shared = set(runs[0][t]["keys"]).intersection(*(r[t]["keys"] for r in runs[1:]))
        keys[t] = [k for k in runs[0][t]["keys"] if k in shared]
    return [t for t in tasks if keys[t]], keys


def zero_like(run: PartItems, metric: ItemMetric) -> PartItems:
    """A run whose numerator is 0 on the same items (the base model's own KL to itself)."""
    return {t: {**d, metric.num: [0.0] * len(d["keys"])} for t, d in run.items()}


def paired_bootstrap(
    a: Sequence[PartItems],
    b: Sequence[PartItems],
    metric: ItemMetric | str,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Paired | None:
    """Mean paired difference ``f(A) - f(B)`` over seeds and its bootstrap CI (module docstring).

    Args:
        a: per seed, method A's items of the metric's part (``task -> arrays``).
        b: per seed (same order), method B's items; one entry is reused for every seed (a base).
        metric: an :class:`ItemMetric` or its name in :data:`ITEM_METRICS`.
        n_boot: bootstrap resamples.
        seed: RNG seed of the resampling (fixed: the same tables every time).
        level: CI coverage.

    Returns:
        :class:`Paired`, or None when the runs share no item.
    """
    metric = ITEM_METRICS[metric] if isinstance(metric, str) else metric
    if len(b) == 1 and len(a) > 1:
        b = list(b) * len(a)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired runs: {len(a)} vs {len(b)} seeds")
    tasks, keys = common_items([*a, *b], metric)
    if not tasks:
        return None
    k = len(a)
    arr_a, arr_b = _arrays(a, metric, tasks, keys), _arrays(b, metric, tasks, keys)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, k, size=(n_boot, k)) if k > 1 else np.zeros((n_boot, 1), int)
    point = np.zeros(k)
    boot = np.zeros((n_boot, k))
    for t in tasks:
        (na, da), (nb, db) = arr_a[t], arr_b[t]
        point += metric.scale * (na.sum(1) / da.sum(1) - nb.sum(1) / db.sum(1))
        idx = rng.integers(0, na.shape[1], size=(n_boot, na.shape[1]))
        diff = metric.scale * (
            na[:, idx].sum(2) / da[:, idx].sum(2) - nb[:, idx].sum(2) / db[:, idx].sum(2)
        )  # [seed, boot]
        boot += diff.T
    point, boot = point / len(tasks), boot / len(tasks)
    stat = np.take_along_axis(boot, seeds, axis=1).mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stat, [alpha, 1 - alpha])
    return Paired(float(point.mean()), float(lo), float(hi), k, sum(len(v) for v in keys.values()))


def noise_floor(
    runs: Sequence[PartItems],
    base: PartItems | None,
    metric: ItemMetric | str,
    k_compare: int = 3,
    n_boot: int = 2000,
) -> dict[str, Any] | None:
    """Noise-floor numbers of one metric from ``k`` seeds of one method and the base model.

    Returns:
        ``{metric, base, mean, effect, improvement, sd_seed, ci_half_width, se_items_pair, mdd,
        ratio, n_seeds, n_items}``: ``effect`` = mean over seeds of ``f(run) - f(base)``;
        ``improvement`` is the effect signed so that positive is better (lower loss, higher
        accuracy); ``ratio`` = ``|effect| / mdd``. None when the runs share no item.
    """
    metric = ITEM_METRICS[metric] if isinstance(metric, str) else metric
    if base is None or not metric.strata(base):
        if metric.name != "general_kl":
            return None
        base = zero_like(runs[0], metric)  # KL(base || base) = 0 on the same items
    ci = paired_bootstrap(runs, [base], metric, n_boot=n_boot)
    if ci is None:
        return None
    tasks, keys = common_items([*runs, base], metric)
    restricted = [{t: _subset(r[t], keys[t]) for t in tasks} for r in runs]
    values = [metric.value(r) for r in restricted]
    base_value = metric.value({t: _subset(base[t], keys[t]) for t in tasks})
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    pair_var = []
    for r1, r2 in itertools.combinations(restricted, 2):
        p = paired_bootstrap([r1], [r2], metric, n_boot=n_boot)
        if p is not None:
            pair_var.append((p.half_width / Z_975) ** 2)
    se_pair = math.sqrt(sum(pair_var) / len(pair_var)) if pair_var else float("nan")
    mdd = (Z_975 + Z_80) * math.sqrt((2 * sd**2 + se_pair**2) / k_compare)
    effect = ci.mean
    improvement = effect if metric.higher_is_better else -effect
    return {
        "metric": metric.name,
        "base": base_value,
        "mean": float(np.mean(values)),
        "effect": effect,
        "improvement": improvement,
        "sd_seed": sd,
        "ci_half_width": ci.half_width,
        "se_items_pair": se_pair,
        "mdd": mdd,
        "ratio": abs(effect) / mdd if mdd > 0 else float("inf"),
        "n_seeds": len(runs),
        "n_items": ci.n_items,
    }


def _subset(items: Mapping[str, Any], keys: list[str]) -> dict[str, list]:
    pos = {k: i for i, k in enumerate(items["keys"])}
    idx = [pos[k] for k in keys]
    return {
        f: [v[i] for i in idx] if isinstance(v, list) and len(v) == len(pos) else v
        for f, v in items.items()
    }
