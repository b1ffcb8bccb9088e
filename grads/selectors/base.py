"""The selector interface and the helpers every criterion shares.

A selector has one job (``select(table, budget, seed) -> Selection``): score the valid rows of a
features table, keep the best ``budget.resolve(n_valid)`` and return them ranked best first.
Shared rules, implemented once here so every criterion obeys them:

* **Exclusion, never silent.** Rows whose required columns are NaN/inf (samples with no supervised
  tokens) are dropped before scoring and counted per column in ``diagnostics["excluded"]``.
  Fraction budgets resolve against the *valid* pool.
* **Determinism.** The ranking is the stable order of ``(-score, id)``: the same table, budget and
  seed give the same ids in the same order, and ties are broken by id, not by row order.
* **Cost.** :func:`rank_top` is O(n) (one ``np.partition``) plus a sort of the ``k`` kept rows;
  ids are materialised only for the kept rows and tie groups, never for the whole pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from grads.features.store import Representation
from grads.selectors.budget import Budget, BudgetError, parse_budget

log = logging.getLogger(__name__)

ID = "id"


@dataclass
class Selection:
    """The output of a selector.

    Attributes:
        ids: selected sample ids, best first.
        scores: the criterion's score of each selected id (same order, float64).
        positions: row positions of the selected ids in the input table (same order).
        diagnostics: JSON-serialisable facts about the run (criterion, pool/valid/selected sizes,
            budget, bandwidth, threshold, exclusion counts, timings, ...).
        artifacts: arrays for plots, not serialised: ``values`` (the plotted quantity over the
            valid pool), ``selected_values``, ``xlabel`` and, for KDE selectors, ``grid``,
            ``density`` and ``threshold``.
    """

    ids: list[str]
    scores: np.ndarray
    positions: np.ndarray
    diagnostics: dict[str, Any]
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def records(self) -> Iterator[dict[str, Any]]:
        """Rows for ``selection.jsonl``: ``{"id", "rank", "score"}`` with rank 0 = best."""
        for rank, (sid, score) in enumerate(zip(self.ids, self.scores.tolist())):
            yield {"id": sid, "rank": rank, "score": score}


@runtime_checkable
class Selector(Protocol):
    """A data-selection criterion over a features table.

    Attributes:
        name: criterion label written to diagnostics, paths and tables.
        requires: optional feature columns that the features stage must compute for this selector
            (e.g. ``("ifd",)``); the always-present columns (``loss``, ``n_tokens``, ``embed``,
            ``lm_head``) are not listed.
        columns: every feature column the selector reads (validated and NaN-filtered).
        supports_auto: whether ``budget=auto`` is allowed (the selector picks its own size).
        budget_free: the output ignores the budget, so the select cache key drops it (``full``).
        model_free: selection needs no model, so its cost is the select stage alone
            (``random``, ``full``).
    """

    name: str
    budget_free: ClassVar[bool]
    model_free: ClassVar[bool]

    @property
    def requires(self) -> tuple[str, ...]: ...

    @property
    def columns(self) -> tuple[str, ...]: ...

    @property
    def supports_auto(self) -> bool: ...

    def select(self, table: pd.DataFrame, budget: Budget, seed: int) -> Selection: ...


@runtime_checkable
class RepresentationSelector(Selector, Protocol):
    """A selector that also reads per-sample vectors computed once by the features stage.

    The select stage loads the named :class:`Representation` objects (pool rows and, when
    ``requires_target``, the domain's target set) and calls ``select(..., reps=reps)``.

    Attributes:
        representations: names of the representation passes this selector reads, e.g.
            ``("lora_grads",)`` (LESS) or ``("hidden",)`` (RDS+); see :mod:`grads.features.representations`.
        requires_target: whether the passes must also embed the domain's target set
            (``domain.target``, see :mod:`grads.data.targets`).
    """

    @property
    def representations(self) -> tuple[str, ...]: ...

    @property
    def requires_target(self) -> bool: ...

    def select(
        self,
        table: pd.DataFrame,
        budget: Budget,
        seed: int,
        reps: dict[str, Representation] | None = None,
    ) -> Selection: ...


@dataclass(frozen=True)
class Traits:
    """What the pipeline needs to know about a selector class, with explicit defaults.

    Attributes:
        representations: representation passes the features stage must run (default none).
        requires_target: whether those passes embed the domain target set (default false).
        budget_free: the output ignores the budget, so the select cache key drops it (``full``).
        model_free: selection needs no model, so its cost is the select stage alone
            (``random``, ``full``).
    """

    representations: tuple[str, ...] = ()
    requires_target: bool = False
    budget_free: bool = False
    model_free: bool = False


def traits(selector: Any) -> Traits:
    """The :class:`Traits` of a selector instance or class (attributes it does not declare are
    the defaults, so existing selectors need no change)."""
    return Traits(
        representations=tuple(getattr(selector, "representations", ()) or ()),
        requires_target=bool(getattr(selector, "requires_target", False)),
        budget_free=bool(getattr(selector, "budget_free", False)),
        model_free=bool(getattr(selector, "model_free", False)),
    )


def need_representation(
    reps: dict[str, Representation] | None, name: str, selector: str, target: bool = False
) -> Representation:
    """The representation ``name`` from ``reps``, or a ValueError saying how to compute it."""
    rep = (reps or {}).get(name)
    if rep is None:
        raise ValueError(
            f"selector {selector!r} needs the {name!r} representation of the pool, computed by the "
            f"features stage (features.representations, see grads.features.representations); got "
            f"{sorted(reps or {})}. Run it through the pipeline (grads selector={selector}) or "
            "pass reps= to select()"
        )
    if target and (rep.target is None or rep.target.shape[0] == 0):
        raise ValueError(
            f"selector {selector!r} needs the target set embedded in the {name!r} representation, "
            "but it has none: set domain.target (see grads.data.targets and conf/domain/*.yaml)"
        )
    return rep


def representation_pool(
    table: pd.DataFrame, rep: Representation, columns: Sequence[str], selector: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The valid pool of a representation selector and each valid row's matrix row.

    A table row is valid when its ``columns`` are finite (e.g. ``loss``: it has a supervised
    token), the representation has a row for its id, and that row is finite. Exclusions are counted
    like :func:`valid_rows` does, plus ``no_representation`` and ``nonfinite_representation``.

    Returns:
        ``(valid, rows, excluded)``: table positions, matrix rows (same order) and the counts.

    Raises:
        ValueError: when no row is left.
    """
    check_columns(table, columns, selector)
    arrays = {c: column(table, c) for c in columns}
    valid, excluded = valid_rows(arrays)
    positions = np.arange(len(table)) if valid is None else valid
    rows = rows_in(table, valid, rep.pool_ids)
    has = rows >= 0
    finite = np.zeros(rows.size, dtype=bool)
    if has.any():
        finite[has] = np.isfinite(np.asarray(rep.pool[rows[has], 0], dtype=np.float64))
    excluded["no_representation"] = int((~has).sum())
    excluded["nonfinite_representation"] = int((has & ~finite).sum())
    excluded["total"] = len(table) - int(finite.sum())
    log_exclusions(selector, excluded, len(table))
    if not finite.any():
        raise ValueError(f"{selector}: no valid samples to select from ({excluded})")
    return positions[finite], rows[finite], excluded


def rows_in(table: pd.DataFrame, valid: np.ndarray | None, rep_ids: np.ndarray) -> np.ndarray:
    """For each valid table row, its row in a representation matrix (-1 where it has none)."""
    index = {str(v): i for i, v in enumerate(rep_ids)}
    ids = table[ID].to_numpy(dtype=object) if valid is None else ids_at(table, valid)
    return np.fromiter((index.get(str(v), -1) for v in ids), dtype=np.int64, count=len(ids))


# ----------------------------------------------------------------------------------------------
# Shared helpers


def check_columns(table: pd.DataFrame, columns: Sequence[str], selector: str) -> None:
    """Raise a ValueError naming the missing columns and how to get them."""
    missing = [c for c in (ID, *columns) if c not in table.columns]
    if not missing:
        return
    hint = ""
    if "ifd" in missing:
        hint = (
            " The 'ifd' column is computed only on request: set features.ifd=true (or auto with an "
            "IFD selector) and re-run the features stage."
        )
    elif any("_tok_" in c for c in missing):
        hint = " Per-token statistics need features.stats=true in the features stage."
    raise ValueError(
        f"selector {selector!r} needs column(s) {missing} missing from the features table "
        f"(has {list(table.columns)}).{hint}"
    )


def column(table: pd.DataFrame, name: str) -> np.ndarray:
    """A feature column as float64 without copying when it already is one."""
    return np.asarray(table[name].to_numpy(dtype=np.float64, na_value=np.nan))


def valid_rows(
    arrays: dict[str, np.ndarray], positive: Sequence[str] = ()
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Rows where every array is finite (and > 0 for ``positive`` names, e.g. before a log).

    Returns:
        ``(positions, excluded)``: ``positions`` of the valid rows, or ``None`` when all rows are
        valid (so hot paths skip a copy); ``excluded`` counts per reason and column plus ``total``.
    """
    n = len(next(iter(arrays.values()))) if arrays else 0
    mask: np.ndarray | None = None
    nonfinite: dict[str, int] = {}
    nonpositive: dict[str, int] = {}
    for name, a in arrays.items():
        ok = np.isfinite(a)
        n_bad = n - int(np.count_nonzero(ok))
        if n_bad:
            nonfinite[name] = n_bad
        if name in positive:
            with np.errstate(invalid="ignore"):
                not_pos = ok & ~(a > 0)
            n_not_pos = int(np.count_nonzero(not_pos))
            if n_not_pos:
                nonpositive[name] = n_not_pos
                ok &= ~not_pos
                n_bad += n_not_pos
        if n_bad:
            mask = ok if mask is None else (mask & ok)
    excluded: dict[str, Any] = {"nonfinite": nonfinite}
    if positive:
        excluded["nonpositive"] = nonpositive
    if mask is None:
        excluded["total"] = 0
        return None, excluded
    positions = np.flatnonzero(mask)
    excluded["total"] = n - positions.size
    return positions, excluded


def take(a: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    return a if positions is None else a[positions]


def ids_at(table: pd.DataFrame, positions: np.ndarray) -> np.ndarray:
    """Ids of the given table rows as an object array of ``str`` (only those rows are touched)."""
    sub = table[ID].take(positions)
    arr = sub.to_numpy(dtype=object)
    if arr.size and not isinstance(arr[0], str):
        arr = np.array([str(v) for v in arr], dtype=object)
    return arr


def resolve_size(
    budget: Budget, n_valid: int, selector: str, supports_auto: bool, auto_size: int | None = None
) -> int:
    """Turn a budget into a sample count for a selector.

    Raises:
        BudgetError: for ``auto`` with a selector that cannot choose its size, or for budgets that
            do not fit the valid pool (see :meth:`Budget.resolve`).
    """
    if budget.is_auto:
        if not supports_auto:
            raise BudgetError(
                f"budget=auto is only valid for selectors that choose their own size (the adaptive "
                f"KDE rule, selector=grads_adaptive, or selector=full); selector {selector!r} needs "
                f"a fraction or count budget such as budget=p5"
            )
        if auto_size is None:
            raise ValueError(f"selector {selector!r} did not provide an automatic size")
        if auto_size < 1:
            raise BudgetError(f"selector {selector!r} chose an empty subset under budget=auto")
        return int(auto_size)
    return budget.resolve(n_valid)


def rank_top(scores: np.ndarray, k: int, ids_for: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Indices of the ``k`` highest scores, ordered by ``(-score, id)``.

    O(n) selection with ``np.partition`` to find the k-th largest score, then a sort of only the
    kept rows. Rows tied with the k-th score are admitted in id order, so which of them enter the
    subset does not depend on row order either.

    Args:
        scores: finite float scores over the valid pool.
        k: how many to keep (1 <= k <= len(scores)).
        ids_for: maps indices into ``scores`` to their ids (called only on kept rows / tie groups).
    """
    n = scores.size
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} samples")
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        above = np.flatnonzero(scores > kth)
        ties = np.flatnonzero(scores == kth)
        need = k - above.size
        if ties.size > need:
            ties = ties[np.argsort(ids_for(ties), kind="stable")[:need]]
        cand = np.concatenate([above, ties])
    else:
        cand = np.arange(n)
    s = scores[cand]
    order = np.argsort(-s, kind="stable")
    ss = s[order]
    if ss.size > 1 and np.any(ss[1:] == ss[:-1]):
        order = np.lexsort((ids_for(cand), -s))
    return cand[order]


def finish(
    table: pd.DataFrame,
    scores: np.ndarray,
    k: int,
    valid: np.ndarray | None,
    diagnostics: dict[str, Any],
    artifacts: dict[str, Any] | None = None,
) -> Selection:
    """Rank the valid pool by ``scores``, keep ``k`` and package a :class:`Selection`.

    ``scores`` is aligned with the valid pool (``valid`` maps it back to table rows; ``None`` means
    all rows). Adds ``selected`` and ``score_threshold`` (lowest kept score) to the diagnostics.
    """
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError(
            f"{diagnostics.get('criterion')}: non-finite scores after filtering"
        )

    def ids_for(local: np.ndarray) -> np.ndarray:
        return ids_at(table, _rows(valid, local))

    local = rank_top(scores, k, ids_for)
    positions = _rows(valid, local)
    ids = ids_at(table, positions).tolist()
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"{diagnostics.get('criterion')}: duplicate ids among the selected rows; the features "
            "table must have one row per sample id"
        )
    kept = scores[local]
    diagnostics["selected"] = len(ids)
    diagnostics["score_threshold"] = float(kept[-1]) if kept.size else None
    art = dict(artifacts or {})
    if "values" in art and "selected_values" not in art:
        art["selected_values"] = np.asarray(art["values"])[local]
    return Selection(
        ids=ids, scores=kept, positions=positions, diagnostics=diagnostics, artifacts=art
    )


def _rows(valid: np.ndarray | None, local: np.ndarray) -> np.ndarray:
    return local if valid is None else valid[local]


def base_diagnostics(
    criterion: str,
    table: pd.DataFrame,
    n_valid: int,
    budget: Budget,
    k: int,
    seed: int,
    excluded: dict[str, Any],
) -> dict[str, Any]:
    """The diagnostics every selector reports; criterion-specific keys are added by the caller."""
    return {
        "criterion": criterion,
        "pool_size": len(table),
        "n_valid": n_valid,
        "budget": budget.to_dict(),
        "resolved_k": k,
        "seed": seed,
        "excluded": excluded,
    }


def log_exclusions(criterion: str, excluded: dict[str, Any], n_pool: int) -> None:
    if excluded.get("total"):
        log.warning(
            "%s: excluded %d of %d rows before scoring: %s",
            criterion,
            excluded["total"],
            n_pool,
            {k: v for k, v in excluded.items() if k != "total"},
        )


def select_by_score(
    criterion: str,
    table: pd.DataFrame,
    budget: Budget | Any,
    seed: int,
    columns: Sequence[str],
    score: Callable[[dict[str, np.ndarray]], np.ndarray],
    xlabel: str,
    supports_auto: bool = False,
    extra: dict[str, Any] | None = None,
) -> Selection:
    """The whole pipeline for a single-score criterion (the baselines).

    Validates ``columns``, drops non-finite rows (counted), scores the valid pool with
    ``score(arrays)``, resolves the budget (``auto`` keeps the whole valid pool when
    ``supports_auto``) and returns the top-k by ``(-score, id)``. The plotted quantity is the score.
    """
    budget = parse_budget(budget)
    check_columns(table, columns, criterion)
    arrays = {c: column(table, c) for c in columns}
    valid, excluded = valid_rows(arrays)
    log_exclusions(criterion, excluded, len(table))
    arrays = {c: take(a, valid) for c, a in arrays.items()}
    n_valid = len(table) if valid is None else valid.size
    k = resolve_size(budget, n_valid, criterion, supports_auto, auto_size=n_valid)
    scores = np.asarray(score(arrays), dtype=np.float64)
    diag = base_diagnostics(criterion, table, n_valid, budget, k, seed, excluded)
    diag.update(extra or {})
    return finish(table, scores, k, valid, diag, {"values": scores, "xlabel": xlabel})
