"""Class-balanced selection for any selector (``select.balance``): an option, not the paper's.

On a classification-like pool (legal's CUAD clauses: every answer is "Yes" or "No") a criterion
that ranks by loss, gradient norm or IFD can fill its whole budget from one class, because the
warm-up model fits one class better than the other (RESULTS.md, "Legal"). The paper does not say
whether GrADS balances labels; this module lets a user ask for it and measure it, with any
selector:

1. the selector ranks the **whole** valid pool (its own criterion, unchanged; :func:`ranking`);
2. each group (the sample's answer, or its pool source) gets a quota of the budget proportional to
   its share of the valid pool (largest remainders, so the quotas sum to the budget exactly);
3. each group's quota is filled in the selector's ranking order; the subset keeps that order.

``answer`` groups need a label-like pool (at most :data:`MAX_ANSWER_CLASSES` distinct answers);
:func:`preflight` checks that, the budget and the selector before any stage runs. The run is
reported as ``<selector>+<by>_balanced`` (:func:`method_name`), so its rows never mix with the
selector's own.

Balanced or not, on a label-like pool the select stage records the subset's answers against the
pool's in ``selection.json`` (:func:`answer_shares`) and warns when they are far apart
(:func:`warn_if_skewed`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from grads.selectors.base import Selection, Selector, traits
from grads.selectors.budget import Budget

BALANCE_BY = ("answer", "source")
MAX_ANSWER_CLASSES = 20  # more distinct answers than this: a generative pool, not a label set
# total variation between a subset's answers and the pool's above which the select stage warns
SKEW_WARNING = 0.2

log = logging.getLogger(__name__)


def balance_of(cfg: Mapping) -> str | None:
    """``select.balance`` of a resolved config (``None``: off, the default)."""
    return ((cfg.get("select") or {}) if isinstance(cfg, Mapping) else {}).get("balance")


def method_name(cfg: Mapping) -> str:
    """The name a run's rows carry: the selector's, suffixed when the selection is balanced."""
    name = str((cfg.get("selector") or {}).get("name", "?"))
    by = balance_of(cfg)
    return f"{name}+{by}_balanced" if by else name


def group_labels(records: Iterable[Any], by: str) -> dict[str, str]:
    """``{sample id: group}`` for ``by`` = ``answer`` (the stripped response) or ``source``.

    Raises:
        ValueError: for an unknown ``by``, or ``answer`` on a pool with more than
            :data:`MAX_ANSWER_CLASSES` distinct answers (a few examples are named).
    """
    if by not in BALANCE_BY:
        raise ValueError(f"select.balance={by!r}: choose one of {BALANCE_BY} or null")
    if by == "source":
        return {r.id: str(r.source) for r in records}
    labels = {r.id: r.response.strip() for r in records}
    classes = Counter(labels.values())
    if len(classes) > MAX_ANSWER_CLASSES:
        examples = ", ".join(repr(a[:40]) for a, _ in classes.most_common(3))
        raise ValueError(
            f"select.balance=answer needs a label-like pool (at most {MAX_ANSWER_CLASSES} distinct "
            f"answers); this pool has {len(classes)} (most common: {examples}). Balance by "
            "source (select.balance=source) or not at all (select.balance=null)"
        )
    return labels


def answer_labels(cfg: Mapping) -> dict[str, str] | None:
    """``{sample id: answer}`` of the run's pool when its answers are labels, else ``None`` (free
    text, or a pool that cannot be read again: the warm-up has read it, so this is only a report).

    The pool is streamed and the read stops at the first answer beyond
    :data:`MAX_ANSWER_CLASSES` distinct ones, so a free-text pool costs a few records."""
    from grads.data.pool import iter_pool_records

    labels: dict[str, str] = {}
    classes: set[str] = set()
    try:
        for rec in iter_pool_records(cfg["domain"], cfg["data"], Counter()):
            answer = rec.response.strip()
            classes.add(answer)
            if len(classes) > MAX_ANSWER_CLASSES:
                return None
            labels[rec.id] = answer
    except (ValueError, OSError, KeyError) as exc:
        log.debug("no answer labels for the select report: %s", exc)
        return None
    return labels


def answer_shares(selected: Iterable[str], pool: Iterable[str], labels: Mapping[str, str]) -> dict:
    """How the subset's answers compare with the pool's: counts of each and their total variation
    distance (0: the pool's shares; 1: disjoint answers)."""
    in_pool = Counter(labels[i] for i in pool if i in labels)
    in_subset = Counter(labels[i] for i in selected if i in labels)
    n_pool, n_sub = sum(in_pool.values()), sum(in_subset.values())
    tv = (
        0.5 * sum(abs(in_subset[a] / n_sub - in_pool[a] / n_pool) for a in in_pool)
        if n_pool and n_sub
        else 0.0
    )
    return {
        "pool": dict(sorted(in_pool.items())),
        "subset": dict(sorted(in_subset.items())),
        "total_variation": round(tv, 4),
    }


def warn_if_skewed(shares: Mapping, selector: str) -> bool:
    """Log a warning (and return True) when a subset's answers are far from the pool's."""
    if shares["total_variation"] < SKEW_WARNING:
        return False

    def pct(counts: Mapping[str, int]) -> str:
        n = sum(counts.values()) or 1
        return ", ".join(f"{a!r} {100 * c / n:.0f} %" for a, c in counts.items())

    log.warning(
        "select %s: the subset's answers (%s) are far from the pool's (%s; total variation %.2f). "
        "A loss- or gradient-ranked criterion can fill the budget from the class the warm-up fits "
        "worst; select.balance=answer gives each answer its pool share of the budget",
        selector,
        pct(shares["subset"]),
        pct(shares["pool"]),
        shares["total_variation"],
    )
    return True


def quotas(counts: Mapping[str, int], k: int) -> dict[str, int]:
    """Split ``k`` over groups in proportion to ``counts`` (Hamilton's largest remainders).

    Remainder ties go to the larger group, then to the group name, so the split is deterministic.
    Every quota is at most its group's count (a quota is ``floor`` of a share <= the count, plus
    at most one when the share has a remainder).
    """
    n = sum(counts.values())
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} samples")
    exact = {g: k * c / n for g, c in counts.items()}
    out = {g: math.floor(e) for g, e in exact.items()}
    rest = k - sum(out.values())
    order = sorted(counts, key=lambda g: (-(exact[g] - out[g]), -counts[g], g))
    for g in order[:rest]:
        out[g] += 1
    return out


def balanced_select(
    selector: Selector,
    table: pd.DataFrame,
    budget: Budget,
    seed: int,
    labels: Mapping[str, str],
    by: str = "answer",
    reps: dict | None = None,
) -> Selection:
    """``selector``'s ranking of the whole valid pool, cut to per-group quotas (module docstring).

    Raises:
        ValueError: for ``budget=auto`` or a budget-free selector (nothing to balance), or when a
            ranked id has no group (the labels come from another pool).
    """
    check_balanceable(selector, budget)
    ranked = ranking(selector, table, seed, reps)
    groups = np.array([labels.get(i) for i in ranked.ids], dtype=object)
    if any(g is None for g in groups):
        missing = [i for i, g in zip(ranked.ids, groups) if g is None][:3]
        raise ValueError(
            f"select.balance={by}: {int(sum(g is None for g in groups))} ranked ids have no {by} "
            f"in the pool records (e.g. {missing}); the features table and the pool disagree"
        )
    # the pool a fraction resolves against: the selector's valid pool (IFD's is larger than the
    # part its filter lets through), so a balanced subset is as large as the selector's own
    k = budget.resolve(int(ranked.diagnostics.get("n_valid") or len(ranked)))
    if k > len(ranked):
        raise ValueError(
            f"select.balance: budget {budget.name} asks for {k} samples but selector "
            f"{getattr(selector, 'name', '?')!r} ranks only {len(ranked)}"
        )
    counts = Counter(groups.tolist())
    want = quotas(counts, k)
    taken: Counter = Counter()
    keep = np.zeros(len(ranked), dtype=bool)
    for i, g in enumerate(groups):
        if taken[g] < want[g]:
            taken[g] += 1
            keep[i] = True
    art = dict(ranked.artifacts)
    if len(np.atleast_1d(art.get("selected_values", []))) == len(ranked):
        art["selected_values"] = np.asarray(art["selected_values"])[keep]
    diagnostics = dict(ranked.diagnostics)
    kept_scores = ranked.scores[keep]
    diagnostics |= {
        "budget": budget.to_dict(),
        "resolved_k": k,
        "selected": int(keep.sum()),
        "score_threshold": float(kept_scores.min()) if kept_scores.size else None,
        "balance": {
            "by": by,
            "pool": dict(sorted(counts.items())),
            "quotas": dict(sorted(want.items())),
            # what the selector alone would have kept (its top k), for the record
            "unbalanced": dict(sorted(Counter(groups[:k].tolist()).items())),
        },
    }
    return Selection(
        ids=[i for i, kept in zip(ranked.ids, keep) if kept],
        scores=kept_scores,
        positions=ranked.positions[keep],
        diagnostics=diagnostics,
        artifacts=art,
    )


def ranking(selector: Any, table: pd.DataFrame, seed: int, reps: dict | None = None) -> Selection:
    """The selector's ranking of every sample it would consider: its ``ranking`` method where it
    has one (IFD: the samples its filter lets through), else ``select`` with the whole pool as the
    budget."""
    if hasattr(selector, "ranking"):
        return (
            selector.ranking(table, seed, reps=reps)
            if reps is not None
            else selector.ranking(table, seed)
        )
    whole = Budget("fraction", 1.0, name="all")
    if reps is not None:
        return selector.select(table, whole, seed, reps=reps)
    return selector.select(table, whole, seed)


def check_balanceable(selector: Any, budget: Budget) -> None:
    """Raise a ValueError when ``select.balance`` cannot apply to this selector and budget."""
    name = getattr(selector, "name", type(selector).__name__)
    if traits(selector).budget_free:
        raise ValueError(
            f"select.balance: selector {name!r} keeps the whole pool; nothing to balance"
        )
    if budget.is_auto:
        raise ValueError(
            f"select.balance with budget=auto: selector {name!r} would choose its own size, so no "
            "quota can be set; use a sized budget (p5, n100) or select.balance=null"
        )


def preflight(cfg: Mapping, selector: Any) -> dict[str, str] | None:
    """Before any stage runs: the group of every pool sample when ``select.balance`` is set (and
    the checks of :func:`check_balanceable` and :func:`group_labels`), else ``None``."""
    by = balance_of(cfg)
    if not by:
        return None
    from hydra.utils import instantiate

    from grads.data.pool import iter_pool_records

    check_balanceable(selector, instantiate(cfg["budget"]))
    return group_labels(iter_pool_records(cfg["domain"], cfg["data"], Counter()), by)
