"""GrADS as a joint density over the two gradient norms, and a coverage-aware variant.

``grads_paper`` is the reading of GrADS (arXiv 2511.08620) that independent reimplementations
describe: no target set; a 2-D kernel density estimate over (log embedding-gradient norm, log
LM-head-gradient norm) that favours in-distribution samples; the subset is the highest-density
samples first. Each log-norm is robustly standardised (median, IQR / 1.349) so that one isotropic
kernel fits both axes; the KDE is KDEpy's binned ``FFTKDE`` on a ``grid_points^2`` grid
(O(n + G^2 log G), not O(n^2)), read back at every sample by bilinear interpolation. Bandwidth (in
standardised units): ``scott`` (``n^(-1/6)``, equal to Silverman's rule in 2-D), ``ISJ`` (the
geometric mean of the two axes' improved Sheather-Jones bandwidths, robust to multimodality;
Scott's rule if ISJ fails) or a number.

``grads_cover`` (this project's coverage-aware rule) addresses what the synthetic and medical runs
showed is missing from density-first rules: they fill the budget with near-duplicates of the main
mode. It walks the same priority order (``order: density``, or ``stratified``: equal-mass strata of
the density level interleaved so every level is represented) and *suppresses near-duplicates*: a
candidate whose centred cosine similarity to an already accepted sample is at least ``threshold``
in a representation space (``dedup: hidden``, pooled base-model hidden states, shared with RDS+;
or ``lora_grads``, shared with LESS) is deferred. Accepted samples rank first (priority order),
then unvisited ones, then the deferred duplicates, so a budget larger than the number of distinct
samples is still filled. Centring (subtracting the pool mean before the cosine) removes the common
direction that makes all LM hidden states look alike. Cost: O(visited x accepted x d) in blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.features.store import Representation
from grads.selectors.base import (
    Selection,
    base_diagnostics,
    check_columns,
    column,
    finish,
    ids_at,
    log_exclusions,
    need_representation,
    resolve_size,
    rows_in,
    take,
    valid_rows,
)
from grads.selectors.budget import parse_budget
from grads.selectors.grads_kde import bandwidth_for, robust_center_scale, stratified_scores

ORDERS = ("density", "stratified")
DEDUP_SPACES = ("hidden", "lora_grads")


def standardise(cols: Sequence[np.ndarray], fit_idx: np.ndarray | None) -> np.ndarray:
    """``[n, c]`` robust z-scores (median, IQR / 1.349) of each column, fitted on ``fit_idx``."""
    out = []
    for x in cols:
        center, scale, _ = robust_center_scale(x if fit_idx is None else x[fit_idx], "iqr")
        out.append((x - center) / scale)
    return np.stack(out, axis=1)


def joint_bandwidth(z: np.ndarray, rule: str | float) -> tuple[float, str]:
    """A scalar bandwidth for standardised 2-D data (module docstring)."""
    n = max(z.shape[0], 2)
    scott = float(n ** (-1.0 / (z.shape[1] + 4)))
    if not isinstance(rule, str):
        return float(rule), "fixed"
    if rule == "ISJ":
        bws = [bandwidth_for(z[:, j], "ISJ") for j in range(z.shape[1])]
        if all(used == "ISJ" for _, used in bws):
            return float(np.exp(np.mean([np.log(b) for b, _ in bws]))), "ISJ"
        return scott, "scott (ISJ failed)"
    return scott, rule


def joint_density(
    z: np.ndarray, bw: float, grid_points: int = 256, fit_idx: np.ndarray | None = None
) -> np.ndarray:
    """Gaussian KDE of the rows of ``z`` (``[n, 2]``) evaluated at every row, via KDEpy FFTKDE.

    The KDE runs on ``z / bw`` with a unit bandwidth (KDEpy's support solver is accurate there, as
    in :func:`grads.selectors.grads_kde.fit_kde`) and is read back by bilinear interpolation of its
    grid. A degenerate sample (fewer than 3 distinct points) gets a constant density.
    """
    from KDEpy import FFTKDE
    from scipy.interpolate import RegularGridInterpolator

    data = (z if fit_idx is None else z[fit_idx]) / bw
    if data.shape[0] < 3 or np.unique(data, axis=0).shape[0] < 3:
        return np.ones(z.shape[0])
    grid, values = FFTKDE(kernel="gaussian", bw=1.0).fit(data).evaluate(int(grid_points))
    axes = [np.unique(grid[:, j]) for j in range(grid.shape[1])]
    table = np.clip(values.reshape([a.size for a in axes]), 0.0, None)
    interp = RegularGridInterpolator(axes, table, bounds_error=False, fill_value=0.0)
    return interp(z / bw) / bw ** z.shape[1]


def suppress_near_duplicates(
    order: np.ndarray, vectors: np.ndarray, threshold: float, k: int, block: int = 256
) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy walk of ``order`` accepting rows whose cosine to every accepted row is < threshold.

    Args:
        order: row indices in priority order.
        vectors: ``[n, d]`` unit rows (already centred).
        threshold: cosine at or above which a candidate is a near-duplicate.
        k: stop once ``k`` rows are accepted.

    Returns:
        ``(accepted, deferred, visited)``: accepted rows in order, deferred rows in order, and how
        many of ``order`` were visited.
    """
    d = vectors.shape[1]
    acc = np.empty((min(k, order.size), d), dtype=np.float32)
    accepted: list[int] = []
    deferred: list[int] = []
    visited = 0
    for s in range(0, order.size, block):
        idx = order[s : s + block]
        vb = np.asarray(vectors[idx], dtype=np.float32)
        prev = (vb @ acc[: len(accepted)].T).max(axis=1) if accepted else np.full(idx.size, -np.inf)
        gram = vb @ vb.T
        mine: list[int] = []
        for j, r in enumerate(idx):
            visited += 1
            near = prev[j] >= threshold or (mine and gram[j, mine].max() >= threshold)
            if near:
                deferred.append(int(r))
                continue
            mine.append(j)
            acc[len(accepted)] = vb[j]
            accepted.append(int(r))
            if len(accepted) >= k:
                return np.array(accepted), np.array(deferred, dtype=np.int64), visited
    return np.array(accepted), np.array(deferred, dtype=np.int64), visited


def centred_unit(x: np.ndarray) -> np.ndarray:
    """Rows minus their mean, scaled to unit norm (float32)."""
    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=0, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


@dataclass
class JointDensitySelector:
    """GrADS over the joint density of the two gradient norms (module docstring).

    Args:
        name: criterion label.
        layers: the two gradient-norm columns (log-transformed, robustly standardised).
        bandwidth: ``ISJ`` (default), ``scott`` / ``silverman`` (equal in 2-D) or a number.
        grid_points: KDE grid points per axis.
        max_fit: fit the KDE and standardisation on at most this many rows (seeded by ``fit_seed``).
        fit_seed: seed of that subsample.
        dedup: ``null`` (``grads_paper``) or the representation whose near-duplicates are suppressed
            (``hidden`` or ``lora_grads``: ``grads_cover``).
        threshold: centred cosine at or above which two samples are near-duplicates.
        order: priority before suppression, ``density`` or ``stratified`` (over density levels).
        strata: number of equal-mass density strata (``order: stratified``).
    """

    name: str = "grads_paper"
    layers: Sequence[str] = ("embed", "lm_head")
    bandwidth: str | float = "ISJ"
    grid_points: int = 256
    max_fit: int | None = 1_000_000
    fit_seed: int = 0
    dedup: str | None = None
    threshold: float = 0.85
    order: str = "density"
    strata: int = 10
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False
    requires_target: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.layers = tuple(str(c) for c in self.layers)
        checks = [
            (len(self.layers) == 2, f"layers must name two columns, got {self.layers}"),
            (self.dedup in (None, *DEDUP_SPACES), f"dedup must be null or one of {DEDUP_SPACES}"),
            (self.order in ORDERS, f"order must be one of {ORDERS}"),
            (-1.0 <= self.threshold <= 1.0, "threshold must be a cosine in [-1, 1]"),
            (self.grid_points >= 16, "grid_points must be >= 16"),
            (self.strata >= 1, "strata must be >= 1"),
        ]
        if isinstance(self.bandwidth, str) and self.bandwidth not in ("ISJ", "scott", "silverman"):
            try:
                self.bandwidth = float(self.bandwidth)
            except ValueError:
                checks.append((False, "bandwidth must be ISJ, scott, silverman or a number"))
        if not isinstance(self.bandwidth, str):
            checks.append((self.bandwidth > 0, "bandwidth must be > 0"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"JointDensitySelector: {msg}")

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.layers)

    @property
    def representations(self) -> tuple[str, ...]:
        return (self.dedup,) if self.dedup else ()

    def _density(self, table: pd.DataFrame) -> tuple[np.ndarray | None, np.ndarray, dict]:
        """Valid positions, the joint density there, and diagnostics."""
        check_columns(table, self.columns, self.name)
        arrays = {c: column(table, c) for c in self.columns}
        valid, excluded = valid_rows(arrays, positive=self.columns)
        log_exclusions(self.name, excluded, len(table))
        logs = [np.log(take(a, valid)) for a in arrays.values()]
        n = logs[0].size
        if n == 0:
            raise ValueError(f"{self.name}: no valid samples to select from ({excluded})")
        fit_idx = None
        if self.max_fit is not None and n > self.max_fit:
            fit_idx = np.random.default_rng(self.fit_seed).integers(0, n, size=self.max_fit)
        z = standardise(logs, fit_idx)
        bw, used = joint_bandwidth(z if fit_idx is None else z[fit_idx], self.bandwidth)
        dens = joint_density(z, bw, self.grid_points, fit_idx)
        info = {"excluded": excluded, "bandwidth": bw, "bandwidth_rule_used": used}
        return valid, dens, info

    def select(
        self,
        table: pd.DataFrame,
        budget: Any,
        seed: int,
        reps: dict[str, Representation] | None = None,
    ) -> Selection:
        """Rank the valid pool by joint density (with near-duplicate suppression for ``dedup``)."""
        budget = parse_budget(budget)
        rep = need_representation(reps, self.dedup, self.name) if self.dedup else None
        valid, dens, info = self._density(table)
        excluded = info.pop("excluded")
        if rep is not None:
            valid, dens, rows = _restrict_to(table, valid, dens, rep, excluded)
        n = int(dens.size)
        k = resolve_size(budget, n, self.name, False)
        rel = dens / dens.max() if dens.max() > 0 else np.ones(n)
        prio = rel
        if self.order == "stratified":
            level = np.searchsorted(np.sort(rel), rel, side="right") / float(n)
            prio = stratified_scores(level, self.strata, None, seed)
        scores = prio.astype(np.float64)
        extra: dict[str, Any] = {"order": self.order, "dedup": self.dedup}
        if rep is not None:
            ids = ids_at(table, valid)
            order = np.lexsort((ids, -prio))
            vecs = centred_unit(rep.pool[rows])
            acc, dup, visited = suppress_near_duplicates(order, vecs, self.threshold, k)
            # accepted (priority order) > unvisited (priority order) > deferred near-duplicates
            scores = prio.copy()
            scores[acc] = 2.0 + prio[acc]
            scores[dup] = prio[dup] - 2.0
            extra.update(threshold=self.threshold, n_suppressed=int(dup.size), visited=visited)
        diag = base_diagnostics(self.name, table, n, budget, k, seed, excluded)
        diag.update(layers=list(self.layers), grid_points=self.grid_points, **info, **extra)
        art = {"values": rel, "xlabel": "joint KDE density of (log embed, log lm_head) / max"}
        return finish(table, scores, k, valid, diag, art)


def _restrict_to(table, valid, dens, rep: Representation, excluded: dict):
    """Keep the valid rows that have a finite representation row; count the others."""
    positions = np.arange(len(table)) if valid is None else valid
    rows = rows_in(table, valid, rep.pool_ids)
    ok = rows >= 0
    ok[ok] = np.isfinite(np.asarray(rep.pool[rows[ok], 0], dtype=np.float64))
    excluded["no_representation"] = int((~ok).sum())
    excluded["total"] = int(excluded.get("total", 0)) + int((~ok).sum())
    if not ok.any():
        raise ValueError(f"no valid row has a {rep.name!r} representation")
    return positions[ok], dens[ok], rows[ok]
