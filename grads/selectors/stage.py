"""The select stage: features table in, ranked subset and its diagnostics out.

Writes, atomically, to ``out_dir``:

* ``selection.jsonl``: one ``{"id", "rank", "score"}`` per selected sample, best first;
* ``selection.png``: the criterion's histogram over the valid pool with the selected part shaded
  (for GrADS: the signal with the KDE curve and, for the adaptive rule, the threshold);
* ``selection.json``: pool size, selected size, criterion, budget, bandwidth, threshold, exclusion
  counts, the selector's knobs and timings. Written last: its presence marks a complete stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from grads.io import atomic_path, release_memory, write_json, write_jsonl
from grads.selectors.base import ID, Selection, Selector, traits
from grads.selectors.budget import Budget, parse_budget

log = logging.getLogger(__name__)


def run_select(
    selector: Selector | Mapping,
    budget: Budget | Mapping | str,
    features_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    balance: tuple[str, Mapping[str, str]] | None = None,
    answers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run one selector on ``features.parquet`` and write the selection artefacts.

    Args:
        selector: a :class:`Selector` or its config (``_target_`` mapping, instantiated here).
        budget: a :class:`Budget`, its config (``conf/budget/*.yaml``) or a short string (``p5``).
        features_path: the features table (one row per sample id).
        out_dir: folder for ``selection.{jsonl,json,png}``.
        seed: selection seed (random baseline, stratified sampling).
        balance: ``(by, {id: group})`` to split the budget over groups in proportion to the pool
            (:func:`grads.selectors.balance.balanced_select`); ``None``: the selector's own top k.
        answers: ``{id: answer}`` of a label-like pool: the subset's answers against the pool's go
            to ``selection.json`` (``answers``), with a warning when they are far apart.

    Returns:
        The summary written to ``selection.json``.
    """
    t0 = time.perf_counter()
    if isinstance(selector, Mapping):
        from hydra.utils import instantiate

        selector = instantiate(selector)
    budget = parse_budget(budget)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = read_features(features_path, [ID, *selector.columns])
    t1 = time.perf_counter()
    selection = _choose(selector, table, budget, seed, Path(features_path).parent, balance)
    t2 = time.perf_counter()
    write_jsonl(out_dir / "selection.jsonl", selection.records())
    t3 = time.perf_counter()
    plot_selection(selection, out_dir / "selection.png")
    t4 = time.perf_counter()
    d = selection.diagnostics
    summary = {
        "criterion": d.get("criterion", selector.name),
        "pool_size": d.get("pool_size", len(table)),
        "selected": len(selection),
        "budget": budget.to_dict(),
        "bandwidth": d.get("bandwidth"),
        "threshold": d.get("threshold"),
        "excluded": d.get("excluded"),
        "seed": seed,
        "features_path": str(features_path),
        "selector": _knobs(selector),
        "diagnostics": d,
        "timings_s": {"read": t1 - t0, "select": t2 - t1, "write": t3 - t2, "plot": t4 - t3},
    }
    if d.get("balance"):
        summary["balance"] = d["balance"]
    if answers:
        from grads.selectors.balance import answer_shares, warn_if_skewed

        summary["answers"] = answer_shares(selection.ids, table[ID].astype(str), answers)
        warn_if_skewed(summary["answers"], summary["criterion"])
    summary["timings_s"]["total"] = time.perf_counter() - t0
    write_json(out_dir / "selection.json", summary)
    del table, selection
    release_memory()
    log.info(
        "select %s/%s: kept %d of %d (%d excluded) in %.2fs",
        summary["criterion"],
        budget.name,
        summary["selected"],
        summary["pool_size"],
        (d.get("excluded") or {}).get("total", 0),
        summary["timings_s"]["total"],
    )
    return summary


def _choose(
    selector: Selector,
    table: Any,
    budget: Budget,
    seed: int,
    features_dir: Path,
    balance: tuple[str, Mapping[str, str]] | None,
) -> Selection:
    """The selector's subset: with the features stage's passes for representation selectors
    (LESS, RDS+, grads_cover), cut per group when ``balance`` is given."""
    names = traits(selector).representations
    reps = None
    if names:
        from grads.features.store import load_representations

        reps = load_representations(features_dir, names)
    if balance is not None:
        from grads.selectors.balance import balanced_select

        by, labels = balance
        return balanced_select(selector, table, budget, seed, labels, by, reps=reps)
    if reps is not None:
        return selector.select(table, budget, seed, reps=reps)
    return selector.select(table, budget, seed)


def read_features(path: str | os.PathLike, columns: list[str]):
    """Read only the columns a selector needs; missing ones are left for the selector's error.

    Decoding a large table leaves buffers in Arrow's allocator that the frame no longer uses (about
    as much again as the columns); they are handed back to the system before selection starts.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    from grads.io import release_memory

    names = set(pq.read_schema(path).names)
    frame = pd.read_parquet(path, columns=[c for c in dict.fromkeys(columns) if c in names])
    release_memory()
    return frame


def _knobs(selector: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(selector):
        return {
            f.name: getattr(selector, f.name)
            for f in dataclasses.fields(selector)
            if not f.name.startswith("_")
        }
    return {"repr": repr(selector)}


def plot_selection(
    selection: Selection, path: str | os.PathLike, bins: int | None = None
) -> Path | None:
    """Histogram of the plotted quantity over the valid pool with the selected part shaded.

    ``bins`` defaults to :func:`grads.plots.histogram_bins` of the pool size.

    Both histograms are normalised by the pool size, so the shaded area is the selected share and
    the KDE curve (when the selector has one) overlays the pool histogram. Uses matplotlib's Agg
    canvas directly (no pyplot state), imported here to keep the module light.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    art = selection.artifacts
    if "values" not in art:
        return None
    values = np.asarray(art["values"], dtype=np.float64)
    chosen = np.asarray(art.get("selected_values", []), dtype=np.float64)
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    if bins is None:
        from grads.plots import histogram_bins

        bins = histogram_bins(values.size)
    edges = np.linspace(lo, hi, bins + 1)
    norm = 1.0 / (values.size * (edges[1] - edges[0]))
    pool, _ = np.histogram(values, edges)
    picked, _ = np.histogram(chosen, edges)

    d = selection.diagnostics
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.stairs(pool * norm, edges, color="0.35", label=f"pool (n={values.size:,})")
    ax.stairs(
        picked * norm,
        edges,
        fill=True,
        alpha=0.55,
        color="tab:orange",
        label=f"selected (k={chosen.size:,})",
    )
    if art.get("grid") is not None and art.get("density") is not None:
        bw = d.get("bandwidth")
        ax.plot(
            art["grid"],
            art["density"],
            color="tab:blue",
            lw=1.2,
            label=f"KDE ({d.get('bandwidth_rule_used')}, bw={bw:.3g})" if bw else "KDE",
        )
        ax.set_xlim(lo, hi)
    if art.get("threshold") is not None:
        ax.axvline(
            art["threshold"],
            color="tab:red",
            ls="--",
            lw=1,
            label=f"threshold ({d.get('threshold_kind')})",
        )
    rule = f" / {d['rule']}" if d.get("rule") else ""
    budget = (d.get("budget") or {}).get("name")
    ax.set_title(f"{d.get('criterion')}{rule}, budget {budget}: {chosen.size:,} of {values.size:,}")
    ax.set_xlabel(art.get("xlabel", "score"))
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
