"""The export's two figures: ``selection.png`` (where the subset sits) and ``composition.png``
(what it is made of), drawn with :mod:`grads.plots`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def selection_figure(features: Path, pool: Any, art: Mapping, title: str, path: Path) -> Path:
    """The pool in the embedding x LM-head gradient-norm plane (subset marked) beside the histogram
    of the selector's plotted quantity (``scores.parquet``'s ``value``, else its ``score``).

    Args:
        features: the features table (its ``embed`` and ``lm_head`` columns are read).
        pool: :class:`grads.export.scores.PoolScores` of its rows.
        art: :func:`grads.export.scores.plot_artifacts` of the selector's ranking of the pool
            (the axis label, and the KDE curve and threshold where it has them).
        title: the histogram's title.
        path: where the PNG goes.
    """
    import pyarrow.parquet as pq

    from grads.plots import draw_gradient_plane, draw_histogram, new_figure, save_figure

    fig, (left, right) = new_figure(2)
    chosen = pool.selected
    norms = [c for c in ("embed", "lm_head") if c in pq.read_schema(features).names]
    if len(norms) == 2:
        plane = pq.read_table(features, columns=norms)
        x, y = (plane.column(c).to_numpy(zero_copy_only=False) for c in norms)
        del plane
        draw_gradient_plane(left, x, y, chosen)
    else:
        left.set_axis_off()
    col = "value" if np.isfinite(pool.value).any() else "score"
    values = pool.value if col == "value" else pool.score
    draw_histogram(
        right,
        values,
        values[chosen],
        xlabel=str(art.get("xlabel") or col),
        grid=art.get("grid") if col == "value" else None,
        density=art.get("density") if col == "value" else None,
        threshold=art.get("threshold") if col == "value" else None,
    )
    right.set_title(title, fontsize=9)
    return save_figure(fig, path)


def composition_figure(summary: Mapping, path: Path) -> Path | None:
    """One panel per composition axis: group shares, answers, length quantiles, duplicates."""
    from grads.plots import draw_quantiles, draw_shares, new_figure, save_figure

    panels: list[tuple[str, Any]] = [
        (f"by {axis}", c) for axis, c in summary["groups"].items() if len(c["pool"]) > 1
    ]
    if summary.get("answers"):
        panels.append(("by answer", summary["answers"]))
    length = summary.get("length") or {}
    measure = next((m for m in ("supervised_tokens", "response_chars") if m in length), None)
    dup = summary.get("duplicates") or {}
    n = len(panels) + (measure is not None) + bool(dup.get("subset"))
    if n == 0:
        return None
    fig, axes = new_figure(n, width=4.6, height=3.8)
    for ax, (title, c) in zip(axes, panels):
        flag = "  [concentrated]" if c["concentrated"] else ""
        draw_shares(ax, c["pool"], c["subset"], f"{title} (TV {c['total_variation']:.2f}){flag}")
    rest = axes[len(panels) :]
    if measure is not None:
        draw_quantiles(rest[0], length[measure]["pool"], length[measure]["subset"], measure)
        rest = rest[1:]
    if dup.get("subset"):
        _draw_duplicates(rest[0], dup)
    return save_figure(fig, path)


def _draw_duplicates(ax: Any, dup: Mapping) -> None:
    from grads.plots import POOL_COLOR, SUBSET_COLOR

    kinds = ["exact_prompt", "near"]
    x = np.arange(len(kinds))
    ax.bar(x - 0.2, [dup["pool_sample"][k] for k in kinds], 0.4, color=POOL_COLOR, label="pool")
    ax.bar(x + 0.2, [dup["subset"][k] for k in kinds], 0.4, color=SUBSET_COLOR, label="subset")
    top = max([dup["pool_sample"][k] for k in kinds] + [dup["subset"][k] for k in kinds])
    ax.set_ylim(0, max(0.05, 1.2 * top))
    ax.set_xticks(x, ["same prompt", "near duplicate"])
    ax.set_ylabel("share with a duplicate in the set")
    ax.set_title(f"duplicates (sets of {dup['sample_size']:,})", fontsize=9)
    ax.legend(fontsize=8)
