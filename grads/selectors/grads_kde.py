"""GrADS: gradient-aware data selection with a KDE over the gradient signal (arXiv 2511.08620).

GrADS (Liu et al. 2025, "Learn More, Forget Less") runs one warm-up epoch over the pool, reads each
sample's gradient with respect to the input embedding ``E`` and the output projection (LM head)
``W``, and selects with "self-guided criteria that leverage the magnitude and statistical
distribution of gradients": a kernel density estimate (KDE) over the combined gradient signal.

**Signal.** For each configured column ``c`` (``embed = ||dL_i/dE||_F``, ``lm_head = ||dL_i/dW||_F``
and optionally per-token statistics such as ``head_tok_max``)::

    z_ic = (T(x_ic) - median_c) / scale_c          T in {identity, log, rank}
    s_i  = sum_c w_c z_ic / sum_c w_c              scale_c = IQR/1.349 or 1.4826 MAD

Gradient norms are roughly log-normal and the two matrices live on different scales (the LM-head
norm is typically an order of magnitude larger), so the default takes logs and robustly
standardises each column before averaging; otherwise one layer and a few outliers would dominate.

**Density.** ``f`` is a Gaussian KDE of ``s`` computed with KDEpy's ``FFTKDE``: the data are
linearly binned onto an equally spaced grid and convolved with the kernel by FFT, costing
O(n + G log G) instead of the O(n^2) of a direct KDE. Bandwidth: Botev et al.'s improved
Sheather-Jones (``ISJ``, robust to multimodality), ``silverman``, ``scott`` or a number (signal units).
``F`` is the KDE's CDF (trapezoid rule on the grid). Density, CDF and rule scores are evaluated at
every sample by linear interpolation of the grid (equivalent to ``np.interp`` on the uniform grid,
without its per-point binary search). For pools larger than ``max_fit`` the bandwidth and the KDE
(and the median/scale of the standardisation) are fitted on a uniform subsample of ``max_fit`` rows
(with replacement, drawn with ``fit_seed``): with 10^6 points the estimate's error is dominated by
smoothing, not sampling, and ISJ on 10^7 points alone would cost about as much as a full sort.

**Rules** (``rule``), each a score; the subset is the top-k by ``(-score, id)``:

* ``density``: ``f(s_i)``, the most representative samples (the main mode).
* ``magnitude``: ``s_i``, the largest gradients (the upper tail; cf. GraNd, Paul et al. 2021).
* ``density_x_magnitude`` (default): ``f(s_i) * F(s_i)``, typical *and* above-typical gradient.
  Magnitude enters as its percentile ``F``, so the product is scale-free and the same for any
  transform; the maximiser sits just above the main mode (about +0.5 sd for a Gaussian signal).
* ``stratified``: ``strata`` equal-mass strata from ``F``; within each stratum samples get a
  random (``seed``) or magnitude order, and the score ``1 - (r + 1/2) / m_j`` (rank ``r`` of ``m_j``)
  interleaves strata so that any top-k takes ``~ k m_j / n`` from each: the subset keeps the pool's
  distribution of the signal (systematic proportional allocation, within one sample per stratum).
* ``adaptive``: a threshold read off the KDE itself: the first significant valley (local minimum
  with prominence >= ``min_prominence`` x peak) above the main mode; failing that the nearest
  valley below it; failing that the upper half-maximum point of the main mode (unimodal pools).
  The learning-rich side ``s >= threshold`` ranks first (by density within it, or by magnitude),
  then the rest by magnitude, closest to the threshold first. With ``budget=auto`` the subset is
  exactly the learning-rich side; with a numeric budget the ranking is truncated.

**Why ``density_x_magnitude`` is the default.** It is the rule that uses both ingredients the paper
names: magnitude (a large gradient means the model has not learnt the sample yet: *learn more*) and
distribution (high density means the sample is typical of the domain; the extreme-gradient tail,
often noisy or off-domain samples that would drive the largest weight updates, is avoided: *forget
less*). It is a pure ranking, so p5 is nested in p10 ... p50 and a budget sweep varies only the
size, and it is deterministic and seed-independent. ``stratified`` is the distribution-preserving
reading and ``adaptive`` the "self-adaptive" one. It was chosen before any measurement; Table 2
(rule x gradient source on three real domains, RESULTS.md) then kept it by a rule fixed in advance
(``grads.paper.decisions.default_decision``): no cell beat it in every domain. The cross-domain leader,
``stratified`` with both sources, is far better on legal (whose Yes/No pool the default reduces to
one class) and on financial, but worse on medical's held-out bpb over 3 seeds. On a label-like
pool, set ``select.balance=answer`` or ``rule=stratified``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.selectors.base import (
    Selection,
    base_diagnostics,
    check_columns,
    column,
    finish,
    log_exclusions,
    resolve_size,
    take,
    valid_rows,
)
from grads.selectors.budget import parse_budget

log = logging.getLogger(__name__)

RULES = ("density", "magnitude", "density_x_magnitude", "stratified", "adaptive")
TRANSFORMS = ("none", "log", "rank")
SCALES = ("iqr", "mad", "none")
BANDWIDTH_RULES = ("ISJ", "silverman", "scott")
IQR_TO_SD = 1.3489795003921634  # Phi^-1(0.75) - Phi^-1(0.25)
MAD_TO_SD = 1.4826022185056018  # 1 / Phi^-1(0.75)


# ----------------------------------------------------------------------------------------------
# Math on arrays (no tables)


def robust_center_scale(x: np.ndarray, how: str) -> tuple[float, float, str]:
    """Median and a robust scale of ``x``.

    ``iqr``: (Q3 - Q1) / 1.349; ``mad``: 1.4826 median |x - median|; both equal the standard
    deviation for Gaussian data. A zero scale (many identical values) falls back to the other
    robust scale, then to the standard deviation, then to 1.

    Returns:
        ``(center, scale, scale_used)``.
    """
    if how == "none":
        return 0.0, 1.0, "none"
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    candidates = {
        "iqr": lambda: (q3 - q1) / IQR_TO_SD,
        "mad": lambda: MAD_TO_SD * float(np.median(np.abs(x - med))),
        "std": lambda: float(np.std(x)),
    }
    order = [how] + [k for k in ("iqr", "mad", "std") if k != how]
    for name in order:
        scale = float(candidates[name]())
        if scale > 0 and math.isfinite(scale):
            return float(med), scale, name
    return float(med), 1.0, "unit"


def transform(x: np.ndarray, how: str) -> np.ndarray:
    """``T(x)``: identity, natural log (x > 0 required) or empirical CDF rank in (0, 1].

    Always returns a new float64 array the caller may modify in place.
    """
    if how == "log":
        return np.log(x)
    if how == "rank":
        # Empirical CDF: ties share a rank, so the result is independent of row order.
        return np.searchsorted(np.sort(x), x, side="right") / float(x.size)
    return np.array(x, dtype=np.float64, copy=True)


def gradient_signal(
    arrays: dict[str, np.ndarray],
    weights: dict[str, float],
    how: str = "log",
    scale: str = "iqr",
    fit_idx: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """The combined GrADS signal ``s_i = sum_c w_c (T(x_ic) - med_c) / scale_c / sum_c w_c``.

    Args:
        arrays: column name -> values (valid rows only, finite; positive for ``how="log"``).
        weights: column name -> non-negative weight (the keys pick and order the columns).
        how: transform ``T`` (``none``, ``log``, ``rank``).
        scale: robust scale (``iqr``, ``mad``, ``none``).
        fit_idx: rows on which median and scale are estimated (``None``: all rows).

    Returns:
        ``(signal, stats)`` with per-column ``center``, ``scale``, ``scale_used`` and ``weight``.
    """
    total = float(sum(weights.values()))
    out: np.ndarray | None = None
    stats: dict[str, dict[str, Any]] = {}
    for name, w in weights.items():
        t = transform(arrays[name], how)
        center, sc, used = robust_center_scale(t if fit_idx is None else t[fit_idx], scale)
        stats[name] = {"center": center, "scale": sc, "scale_used": used, "weight": w}
        factor = w / (sc * total)
        # In-place arithmetic: at 10^7 rows every avoided temporary saves ~0.1 s of page faults.
        t -= center
        t *= factor
        if out is None:
            out = t
        else:
            out += t
            del t
    assert out is not None
    return out, stats


@dataclass
class KDEFit:
    """A 1-D KDE tabulated on an equally spaced grid.

    Attributes:
        grid: grid points (equally spaced, increasing).
        pdf: density at the grid points (integrates to 1).
        cdf: its cumulative integral (0 at the first point, 1 at the last).
        bandwidth: kernel standard deviation in signal units (NaN if degenerate).
        rule: the bandwidth rule actually used (``ISJ`` can fall back to ``silverman``).
        n_fit: number of points the KDE was fitted on.
    """

    grid: np.ndarray
    pdf: np.ndarray
    cdf: np.ndarray
    bandwidth: float
    rule: str
    n_fit: int

    def at(self, x: np.ndarray, which: str | np.ndarray = "pdf") -> np.ndarray:
        """Interpolate ``pdf``, ``cdf`` or any array tabulated on the grid at ``x``."""
        values = getattr(self, which) if isinstance(which, str) else which
        return interp_uniform(x, self.grid, values)


def interp_uniform(x: np.ndarray, grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.interp(x, grid, values)`` for an equally spaced ``grid``, in O(1) per point.

    The cell index is computed arithmetically instead of by binary search (about 3x faster than
    ``np.interp`` at 10^7 points); points outside the grid take the end values, as ``np.interp``.
    """
    g = grid.size
    if g < 2:
        return np.full(x.shape, float(values[0]) if g else np.nan)
    x0, dx = float(grid[0]), float(grid[-1] - grid[0]) / (g - 1)
    t = np.subtract(x, x0)
    t *= 1.0 / dx
    np.clip(t, 0.0, g - 1.0, out=t)
    i = t.astype(np.intp)
    np.minimum(i, g - 2, out=i)
    t -= i  # fractional position in the cell, in [0, 1]
    out = np.take(np.diff(values), i)
    out *= t
    np.take(values, i, out=t)
    out += t
    return out


def bandwidth_for(x: np.ndarray, rule: str | float, min_bw: float = 0.0) -> tuple[float, str]:
    """Bandwidth by rule (KDEpy's ``improved_sheather_jones`` (Botev et al. 2010),
    ``silvermans_rule``, ``scotts_rule``) or a fixed number, in the units of ``x``.

    A rule that fails (ISJ's fixed-point equation has no root on tiny or heavily tied samples) or
    returns less than ``min_bw`` (ISJ can converge to ~0 on a handful of points) falls back to
    Silverman's rule, and finally to ``min_bw``; the rule actually used is returned with it.
    """
    from KDEpy.bw_selection import improved_sheather_jones, scotts_rule, silvermans_rule

    if not isinstance(rule, str):
        bw = float(rule)
        return (bw, "fixed") if bw >= min_bw else (min_bw, "fixed+floor")
    fns = {"ISJ": improved_sheather_jones, "silverman": silvermans_rule, "scott": scotts_rule}
    # KDEpy's ISJ pads its DCT grid by max(0.5 * range, 6) data units, so it is not
    # scale-equivariant and is biased low for ranges < 12 (KDEpy issue #201), which is exactly the
    # standardised signal's regime. Rescaling to a range of 100 and back gives the invariant value.
    spread = float(np.ptp(x))
    c = 100.0 / spread if spread > 0 else 1.0
    data = (x * c).reshape(-1, 1)
    for name in dict.fromkeys([rule, "silverman"]):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bw = float(fns[name](data)) / c
        except (ValueError, RuntimeError, FloatingPointError, ZeroDivisionError):
            continue
        if bw >= min_bw and bw > 0 and math.isfinite(bw):
            return bw, name
    return max(min_bw, (spread or 1.0) * max(x.size, 2) ** (-0.2)), "floor"


def fit_kde(
    x: np.ndarray, bandwidth: str | float = "ISJ", grid_points: int = 4096, kernel: str = "gaussian"
) -> KDEFit:
    """Binned FFT KDE of ``x`` (KDEpy ``FFTKDE``) tabulated on ``grid_points`` points.

    The bandwidth is floored at one grid cell of the data range (a narrower kernel cannot be
    represented on the grid). The FFT KDE runs on ``x / bw`` with a unit bandwidth and is mapped
    back: KDEpy solves the kernel's practical support with absolute tolerances (``atol=1e-4``,
    ``xtol=1e-3``), which fail or truncate for bandwidths far from ~1 (KDEpy issue #202).
    A constant sample (or one point) has no density to speak of: it gets a unit spike at its
    value so that every rule still runs (all samples tie and ids decide).
    """
    from KDEpy import FFTKDE

    n = int(x.size)
    spread = float(np.ptp(x)) if n else 0.0
    if n < 2 or not spread > 0:
        v = float(x[0]) if n else 0.0
        return KDEFit(
            np.array([v - 1.0, v, v + 1.0]),
            np.array([0.0, 1.0, 0.0]),
            np.array([0.0, 0.5, 1.0]),
            float("nan"),
            "degenerate",
            n,
        )
    bw, used = bandwidth_for(x, bandwidth, min_bw=spread / grid_points)
    c = 1.0 / bw  # unit bandwidth: KDEpy's support solver is exact there (see docstring)
    grid, pdf = FFTKDE(kernel=kernel, bw=1.0).fit(x * c).evaluate(int(grid_points))
    grid = grid / c
    pdf = np.clip(pdf, 0.0, None)  # FFT round-off leaves ~1e-17 negatives in the tails
    cell = np.diff(grid)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * cell)])
    total = cdf[-1]
    return KDEFit(grid, pdf / total, cdf / total, bw, used, n)


def find_threshold(fit: KDEFit, min_prominence: float = 0.05) -> tuple[float, str, float]:
    """The adaptive rule's threshold on the signal, read off the KDE.

    A valley is a grid local minimum whose prominence, ``min(max f left, max f right) - f``, is at
    least ``min_prominence`` times the peak density (so ripples in the tails do not count).

    Returns:
        ``(threshold, kind, mode)``: ``kind`` is ``valley`` (first valley above the main mode),
        ``valley_below_mode`` (nearest valley below it, when the learning-rich mode is the taller
        one), ``half_max`` (no valley: the upper half-maximum point of the main mode) or
        ``degenerate``. (The selector falls back to the mode if no sample lies above.)
    """
    pdf, grid = fit.pdf, fit.grid
    peak = int(np.argmax(pdf))
    mode = float(grid[peak])
    if fit.rule == "degenerate":
        return mode, "degenerate", mode
    ymax = float(pdf[peak])
    d = np.diff(pdf)
    minima = np.flatnonzero((d[:-1] < 0) & (d[1:] >= 0)) + 1
    if minima.size:
        left_max = np.maximum.accumulate(pdf)
        right_max = np.maximum.accumulate(pdf[::-1])[::-1]
        prom = np.minimum(left_max[minima], right_max[minima]) - pdf[minima]
        sig = minima[prom >= min_prominence * ymax]
        above, below = sig[sig > peak], sig[sig < peak]
        if above.size:
            return float(grid[above[0]]), "valley", mode
        if below.size:
            return float(grid[below[-1]]), "valley_below_mode", mode
    after = np.flatnonzero(pdf[peak:] <= 0.5 * ymax)
    j = peak + int(after[0]) if after.size else pdf.size - 1
    return float(grid[j]), "half_max", mode


def stratified_scores(
    cdf_at: np.ndarray, strata: int, order_key: np.ndarray | None, seed: int
) -> np.ndarray:
    """Scores whose top-k is a proportional stratified sample over equal-mass strata.

    Stratum ``j = floor(strata * F(s_i))``. Within a stratum of size ``m_j`` the samples are put in
    random order (``order_key=None``, seeded) or by descending ``order_key``; rank ``r`` gets
    ``1 - (r + 1/2) / m_j``. A cut at any score level therefore keeps ``~ k m_j / n`` from each
    stratum (the pool's proportions), ``r``-th picks of all strata interleaving.
    """
    n = cdf_at.size
    stratum = np.minimum((cdf_at * strata).astype(np.int64), strata - 1).astype(np.int32)
    if order_key is None:
        perm = np.random.default_rng(seed).permutation(n)
        order = perm[np.argsort(stratum[perm], kind="stable")]
    else:
        order = np.lexsort((-order_key, stratum))
    counts = np.bincount(stratum, minlength=strata)
    starts = np.cumsum(counts) - counts
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    return 1.0 - (rank + 0.5) / counts[stratum]


# ----------------------------------------------------------------------------------------------
# The selector


@dataclass
class GradsSelector:
    """GrADS selection over a features table (see the module docstring for the maths).

    Args:
        rule: ``density`` | ``magnitude`` | ``density_x_magnitude`` (default) | ``stratified`` |
            ``adaptive``.
        layers: gradient-norm columns combined into the signal (``embed``, ``lm_head``; one of
            them for the single-layer ablations; ``tied`` for the shared matrix of a tied model).
        extra_columns: optional per-token statistics (``embed_tok_mean/std/max``,
            ``head_tok_mean/std/max``) added to the signal: the "statistical distribution"
            reading. They must be produced by the features stage (``features.stats=true``).
        weights: one non-negative weight per ``layers + extra_columns`` entry (default: equal).
        transform: ``log`` (default), ``none`` or ``rank`` applied to each column before
            standardising. ``log`` excludes non-positive values (counted); use ``rank`` for
            columns that can be 0 (e.g. ``*_tok_std`` of one-token answers).
        scale: robust standardisation, ``iqr`` (default), ``mad`` or ``none``.
        bandwidth: ``ISJ`` (default), ``silverman``, ``scott`` or a positive number.
        kernel: KDEpy kernel name (``gaussian``).
        grid_points: KDE grid size (a power of two is fastest for the FFT).
        max_fit: fit the KDE (and the standardisation) on at most this many rows; ``None`` = all.
        fit_seed: seed of that subsample; fixed apart from the run seed so that the ranking rules
            are seed-independent.
        strata: number of equal-mass strata (``stratified``).
        within: order within a stratum, ``random`` (seeded) or ``magnitude``.
        min_prominence: valley prominence, as a fraction of the peak density (``adaptive``).
        order_by: order on the learning-rich side, ``density`` or ``magnitude`` (``adaptive``).
        name: criterion label in diagnostics and result tables.
    """

    rule: str = "density_x_magnitude"
    layers: Sequence[str] = ("embed", "lm_head")
    extra_columns: Sequence[str] = ()
    weights: Sequence[float] | None = None
    transform: str = "log"
    scale: str = "iqr"
    bandwidth: str | float = "ISJ"
    kernel: str = "gaussian"
    grid_points: int = 4096
    max_fit: int | None = 1_000_000
    fit_seed: int = 0
    strata: int = 10
    within: str = "random"
    min_prominence: float = 0.05
    order_by: str = "density"
    name: str = "grads"
    _weights: dict[str, float] = field(init=False, repr=False)

    base_columns: ClassVar[tuple[str, ...]] = ("embed", "lm_head")
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.layers = tuple(str(c) for c in self.layers)
        self.extra_columns = tuple(str(c) for c in (self.extra_columns or ()))
        cols = self.layers + self.extra_columns
        _check(len(self.layers) > 0, "layers must name at least one gradient column")
        _check(len(set(cols)) == len(cols), f"duplicate signal columns in {cols}")
        _check(self.rule in RULES, f"rule must be one of {RULES}, got {self.rule!r}")
        _check(
            self.transform in TRANSFORMS,
            f"transform must be one of {TRANSFORMS}, got {self.transform!r}",
        )
        _check(self.scale in SCALES, f"scale must be one of {SCALES}, got {self.scale!r}")
        _check(
            self.within in ("random", "magnitude"),
            f"within must be random|magnitude, got {self.within!r}",
        )
        _check(
            self.order_by in ("density", "magnitude"),
            f"order_by must be density|magnitude, got {self.order_by!r}",
        )
        if isinstance(self.bandwidth, str) and self.bandwidth not in BANDWIDTH_RULES:
            try:
                self.bandwidth = float(self.bandwidth)
            except ValueError:
                raise ValueError(
                    f"GradsSelector: bandwidth must be one of {BANDWIDTH_RULES} or a "
                    f"positive number, "
                    f"got {self.bandwidth!r}"
                ) from None
        if not isinstance(self.bandwidth, str):
            _check(self.bandwidth > 0, f"bandwidth must be > 0, got {self.bandwidth!r}")
        _check(self.grid_points >= 16, f"grid_points must be >= 16, got {self.grid_points}")
        _check(
            self.max_fit is None or self.max_fit >= 100,
            f"max_fit must be >= 100 or null, got {self.max_fit}",
        )
        _check(self.strata >= 1, f"strata must be >= 1, got {self.strata}")
        _check(
            0 <= self.min_prominence < 1,
            f"min_prominence must be in [0, 1), got {self.min_prominence}",
        )
        w = [1.0] * len(cols) if self.weights is None else [float(v) for v in self.weights]
        _check(len(w) == len(cols), f"weights needs one entry per column of {cols}, got {w}")
        _check(
            all(v >= 0 for v in w) and sum(w) > 0,
            f"weights must be >= 0 with a positive sum, got {w}",
        )
        self.weights = tuple(w)
        self._weights = dict(zip(cols, w))

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.layers) + tuple(self.extra_columns)

    @property
    def requires(self) -> tuple[str, ...]:
        """Optional feature columns beyond the base gradient norms (per-token statistics)."""
        return tuple(c for c in self.columns if c not in self.base_columns)

    @property
    def supports_auto(self) -> bool:
        return self.rule == "adaptive"

    def select(self, table: pd.DataFrame, budget: Any, seed: int) -> Selection:
        """Score the valid pool with the configured rule and keep the budget's top-k."""
        budget = parse_budget(budget)
        t0 = time.perf_counter()
        arrays, valid, excluded, n = self._valid_arrays(table, budget)
        k = None if budget.is_auto else budget.resolve(n)
        fit_idx = None
        if self.max_fit is not None and n > self.max_fit:
            fit_idx = np.random.default_rng(self.fit_seed).integers(0, n, size=self.max_fit)
        signal, stats = gradient_signal(arrays, self._weights, self.transform, self.scale, fit_idx)
        del arrays
        t1 = time.perf_counter()
        kde = fit_kde(
            signal if fit_idx is None else signal[fit_idx],
            self.bandwidth,
            self.grid_points,
            self.kernel,
        )
        t2 = time.perf_counter()
        scores, extra = self._scores(kde, signal, seed)
        if self.rule == "adaptive" and budget.is_auto:
            k = resolve_size(budget, n, self.name, True, auto_size=extra["n_above_threshold"])
        t3 = time.perf_counter()
        diag = base_diagnostics(self.name, table, n, budget, k, seed, excluded)
        diag.update(self._diagnostics(kde, stats), **extra)
        artifacts = {
            "values": signal,
            "xlabel": _signal_label(self),
            "grid": kde.grid,
            "density": kde.pdf,
            "threshold": extra["threshold"],
        }
        sel = finish(table, scores, k, valid, diag, artifacts)
        t4 = time.perf_counter()
        diag["timings_s"] = {"signal": t1 - t0, "kde": t2 - t1, "score": t3 - t2, "rank": t4 - t3}
        return sel

    def _valid_arrays(self, table: pd.DataFrame, budget: Any) -> tuple[dict, Any, dict, int]:
        """The signal columns over the valid rows, the rows kept, the exclusions and their count."""
        check_columns(table, self.columns, self.name)
        arrays = {c: column(table, c) for c in self.columns}
        valid, excluded = valid_rows(
            arrays, positive=self.columns if self.transform == "log" else ()
        )
        log_exclusions(self.name, excluded, len(table))
        arrays = {c: take(a, valid) for c, a in arrays.items()}
        n = len(table) if valid is None else int(valid.size)
        if budget.is_auto and not self.supports_auto:
            resolve_size(budget, n, self.name, False)  # raises the explanatory error
        if n == 0:
            raise ValueError(f"{self.name}: no valid samples to select from ({excluded})")
        return arrays, valid, excluded, n

    def _scores(self, kde: KDEFit, signal: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
        """The configured rule's score of every valid row (higher = kept first) and its facts."""
        extra: dict[str, Any] = {"threshold": None}
        if self.rule == "density":
            return kde.at(signal, "pdf"), extra
        if self.rule == "magnitude":
            return signal, extra
        if self.rule == "density_x_magnitude":
            return kde.at(signal, kde.pdf * kde.cdf), extra
        if self.rule == "stratified":
            key = signal if self.within == "magnitude" else None
            scores = stratified_scores(kde.at(signal, "cdf"), self.strata, key, seed)
            return scores, {**extra, "strata": self.strata, "within": self.within}
        return self._adaptive_scores(kde, signal)

    def _adaptive_scores(self, kde: KDEFit, signal: np.ndarray) -> tuple[np.ndarray, dict]:
        """``adaptive``: rows above the density's valley threshold first (see the module docs)."""
        thr, kind, mode = find_threshold(kde, self.min_prominence)
        upper = signal >= thr
        if not upper.any():
            # Only for a KDE far smoother than the data (half-max point beyond the largest
            # sample). A KDE's mode lies within the data range (up to a grid cell).
            thr, kind = min(mode, float(signal.max())), f"mode (no sample above {kind})"
            upper = signal >= thr
        scores = kde.at(signal, "cdf")  # below the threshold: magnitude percentile, in [0, 1]
        if self.order_by == "density":
            peak = float(kde.pdf.max())
            scores[upper] = 1.0 + kde.at(signal[upper], "pdf") / peak
        else:
            scores[upper] += 1.0
        extra = {
            "threshold": thr,
            "threshold_kind": kind,
            "n_above_threshold": int(np.count_nonzero(upper)),
            "order_by": self.order_by,
            "min_prominence": self.min_prominence,
        }
        return scores, extra

    def _diagnostics(self, kde: KDEFit, stats: dict) -> dict:
        """The rule's settings and the fitted KDE's facts, for ``selection.json``."""
        return dict(
            rule=self.rule,
            layers=list(self.layers),
            extra_columns=list(self.extra_columns),
            weights=list(self.weights),
            transform=self.transform,
            scale=self.scale,
            signal_stats=stats,
            bandwidth=kde.bandwidth if math.isfinite(kde.bandwidth) else None,
            bandwidth_rule=str(self.bandwidth),
            bandwidth_rule_used=kde.rule,
            kernel=self.kernel,
            grid_points=int(kde.grid.size),
            n_fit=kde.n_fit,
            mode=float(kde.grid[int(np.argmax(kde.pdf))]),
        )


def _signal_label(sel: GradsSelector) -> str:
    inner = {"log": "log ", "rank": "rank of ", "none": ""}[sel.transform]
    cols = "+".join(sel.columns)
    return (
        f"GrADS signal: robust z of {inner}{cols} norms"
        if sel.scale != "none"
        else f"{inner}{cols}"
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"GradsSelector: {message}")
