"""Plot helpers shared by the select stage, the export and ``notebooks/analyse_run.py``.

Every function draws on a matplotlib ``Axes`` it is given, so a caller composes the panels it wants
(the export's ``selection.png``: the gradient-norm plane beside the score histogram; the notebook:
the same plane in a pyplot figure). :func:`new_figure` and :func:`save_figure` use the Agg canvas
directly (no pyplot state), and matplotlib is imported inside the functions to keep imports light.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

POOL_COLOR = "0.35"
SUBSET_COLOR = "tab:orange"


def histogram_bins(n: int, lo: int = 5, hi: int = 150) -> int:
    """Bins for a histogram of ``n`` values: Rice's rule ``2 n^(1/3)``, clipped to ``[lo, hi]``.

    60 points get 8 bins, 1,000 get 20, 100,000 get 93: enough to show a shape, never so many
    that most bins hold one point (a fixed 120 bins left a 60-sample pool as isolated spikes).
    """
    return int(min(hi, max(lo, math.ceil(2.0 * max(int(n), 1) ** (1.0 / 3.0)))))


def new_figure(ncols: int, width: float = 6.0, height: float = 4.2):
    """An Agg figure with ``ncols`` side-by-side axes; returns ``(figure, [axes, ...])``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically (a killed process leaves no half-written image)."""
    from grads.io import atomic_path

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


PLANE_POINTS = 20_000  # points drawn per set (pool, subset) in the gradient-norm plane


def draw_gradient_plane(
    ax: Any, embed: Any, lm_head: Any, selected: Any, max_points: int = PLANE_POINTS, seed: int = 0
) -> int:
    """The pool in the plane of the two gradient norms (log-log), the subset marked.

    A set (the rest of the pool, the subset) of more than ``max_points`` samples is drawn as a
    seeded uniform sample of that many, so a pool of millions stays a readable, light figure; the
    title and legend give the full counts.

    Args:
        ax: the axes to draw on.
        embed, lm_head: per-sample ``||dL/dE||`` and ``||dL/dW_head||`` (the features table's
            ``embed`` and ``lm_head`` columns), any array-like.
        selected: boolean mask of the subset, aligned with them.
        max_points: the most points drawn per set.
        seed: seeds the sample.

    Returns:
        How many samples have a finite, positive pair of norms (drawn, or sampled from).
    """
    x = np.asarray(embed, dtype=np.float64)
    y = np.asarray(lm_head, dtype=np.float64)
    chosen = np.asarray(selected, dtype=bool)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    rng = np.random.default_rng(seed)
    pool, sub = np.flatnonzero(ok & ~chosen), np.flatnonzero(ok & chosen)
    n_ok, n_sub = pool.size + sub.size, sub.size
    pool, sub = (
        np.sort(rng.choice(rows, max_points, replace=False)) if rows.size > max_points else rows
        for rows in (pool, sub)
    )
    drawn = pool.size + sub.size
    size = 6 if drawn > 2000 else 14
    ax.scatter(x[pool], y[pool], s=size, alpha=0.45, color=POOL_COLOR, lw=0, label="pool")
    ax.scatter(
        x[sub],
        y[sub],
        s=size * 1.8,
        alpha=0.9,
        color=SUBSET_COLOR,
        edgecolor="black",
        lw=0.3,
        label=f"selected (k={n_sub:,})",
    )
    if n_ok:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("||dL/dE||  (input embedding gradient norm)")
    ax.set_ylabel("||dL/dW||  (LM-head gradient norm)")
    shown = f"; {drawn:,} drawn" if drawn < n_ok else ""
    ax.set_title(f"pool in the gradient-norm plane (n={n_ok:,}{shown})")
    ax.legend(fontsize=8)
    return n_ok


def draw_histogram(
    ax: Any,
    values: Any,
    chosen: Any,
    xlabel: str = "score",
    grid: Any = None,
    density: Any = None,
    threshold: float | None = None,
    bins: int | None = None,
) -> None:
    """Histogram of ``values`` over the pool with the ``chosen`` values' share shaded.

    Both histograms are normalised by the pool size, so the shaded area is the selected share, and
    a KDE (``grid``, ``density``: a pdf over the same quantity) overlays the pool histogram.
    ``bins`` defaults to :func:`histogram_bins` of the pool size.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    c = np.asarray(chosen, dtype=np.float64)
    c = c[np.isfinite(c)]
    if v.size == 0:
        ax.text(0.5, 0.5, "no scored samples", ha="center", va="center", transform=ax.transAxes)
        return
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, (bins or histogram_bins(v.size)) + 1)
    norm = 1.0 / (v.size * (edges[1] - edges[0]))
    ax.stairs(
        np.histogram(v, edges)[0] * norm, edges, color=POOL_COLOR, label=f"pool (n={v.size:,})"
    )
    ax.stairs(
        np.histogram(c, edges)[0] * norm,
        edges,
        fill=True,
        alpha=0.55,
        color=SUBSET_COLOR,
        label=f"selected (k={c.size:,})",
    )
    if grid is not None and density is not None:
        ax.plot(grid, density, color="tab:blue", lw=1.2, label="KDE")
        ax.set_xlim(lo, hi)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", ls="--", lw=1, label="threshold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)


def draw_shares(ax: Any, pool: dict, subset: dict, title: str) -> None:
    """Horizontal bars: each group's share of the pool and of the subset (largest pool group on top)."""
    groups = list(pool)[::-1]
    n_pool, n_sub = sum(pool.values()) or 1, sum(subset.values()) or 1
    y = np.arange(len(groups))
    ax.barh(y + 0.2, [pool[g] / n_pool for g in groups], 0.4, color=POOL_COLOR, label="pool")
    ax.barh(
        y - 0.2,
        [subset.get(g, 0) / n_sub for g in groups],
        0.4,
        color=SUBSET_COLOR,
        label="subset",
    )
    ax.set_yticks(y, [_short(g) for g in groups], fontsize=7)
    ax.set_xlabel("share")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def draw_quantiles(ax: Any, pool: dict, subset: dict, xlabel: str) -> None:
    """Pool and subset as two boxes from their quantiles (``{"q10", "q25", "q50", "q75", "q90"}``):
    whiskers 10-90 %, box 25-75 %, a bar at the median."""
    for y, (q, color) in enumerate(((subset, SUBSET_COLOR), (pool, POOL_COLOR))):
        ax.plot([q["q10"], q["q90"]], [y, y], color=color, lw=1.2)
        ax.barh(y, q["q75"] - q["q25"], 0.5, left=q["q25"], color=color, alpha=0.6)
        ax.plot([q["q50"], q["q50"]], [y - 0.25, y + 0.25], color="black", lw=1.5)
    ax.set_yticks([0, 1], ["subset", "pool"])
    ax.set_ylim(-0.7, 1.7)
    ax.set_xlabel(f"{xlabel} (whiskers 10-90 %, box 25-75 %, bar: median)", fontsize=8)
    ax.set_title(f"length: {xlabel}", fontsize=9)


def _short(text: str, width: int = 32) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
