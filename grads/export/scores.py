"""``scores.parquet``: the whole pool as the selector saw it, one row per sample.

The select stage keeps only the subset (``selection.jsonl``). To show where the subset sits, and to
re-pick another budget or inspect the ranking elsewhere, the export ranks the **whole** features
table again with the run's selector (:func:`grads.selectors.balance.ranking`: the same criterion,
seed and representations, a budget of the whole pool; a fraction of a second for the norm-based
selectors, one pass over the stored representations for LESS / RDS+) and writes:

* every column of the features table (``id``, ``loss``, ``n_tokens``, ``embed``, ``lm_head``, ...);
* ``score``: the selector's score (higher = picked first); for the subset, the score of
  ``selection.jsonl``;
* ``rank``: 0 .. k-1 for the subset in its ``selected.jsonl`` order, then k, k+1, ... for the rest
  of the scored pool in the selector's order (``select.balance`` subsets are not a prefix of the
  ranking, so the subset's ranks come from the selection itself);
* ``selected``: whether the sample is in the subset;
* ``value``: the quantity the histogram shows (GrADS: the robust-z gradient signal; IFD: IFD;
  the baselines: their score), where the selector reports one per sample;
* ``source``, ``template`` (and ``file`` for a multi-shard pool): the groups of the composition
  summary (:mod:`grads.export.composition`).

Samples the selector cannot score (NaN features: no supervised token; IFD's filter) keep their row
with a null ``score``, ``rank`` and ``value``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def features_path(summary: Mapping) -> Path | None:
    """The features table a selection was made from (``selection.json``), if it still exists."""
    path = summary.get("features_path")
    return Path(str(path)) if path and Path(str(path)).exists() else None


def rank_pool(cfg: Mapping, table: Any, seed: int, features_dir: Path) -> Any:
    """The run's selector's ranking of every sample of ``table`` it can score."""
    from hydra.utils import instantiate

    from grads.selectors.balance import ranking
    from grads.selectors.base import traits

    selector = instantiate(cfg["selector"])
    names = traits(selector).representations
    reps = None
    if names:
        from grads.features.store import load_representations

        reps = load_representations(features_dir, names)
    return ranking(selector, table, seed, reps)


def pool_scores(table: Any, picks: Sequence[Mapping], ranked: Any) -> Any:
    """The ``scores.parquet`` frame: ``table`` plus score, rank, selected and value (docstring).

    Args:
        table: the features table (pandas), one row per pool sample.
        picks: ``selection.jsonl`` rows (``id``, ``rank``, ``score``).
        ranked: :func:`rank_pool` of ``table``.

    Raises:
        RuntimeError: a selected id is not in the features table.
    """
    import pandas as pd

    n = len(table)
    where = {str(i): p for p, i in enumerate(table["id"].astype(str))}
    missing = [p["id"] for p in picks if p["id"] not in where]
    if missing:
        raise RuntimeError(
            f"export: {len(missing)} selected ids are not in the features table (first: "
            f"{missing[:3]}); the selection and the features stage disagree: re-run selection"
        )
    score = np.full(n, np.nan)
    value = np.full(n, np.nan)
    rank = np.full(n, -1, dtype=np.int64)
    positions = np.asarray(ranked.positions, dtype=np.int64)
    score[positions] = np.asarray(ranked.scores, dtype=np.float64)
    shown = np.atleast_1d(np.asarray(ranked.artifacts.get("selected_values", []), dtype=float))
    if shown.size == positions.size:
        value[positions] = shown
    chosen = np.zeros(n, dtype=bool)
    for p in sorted(picks, key=lambda p: p["rank"]):
        pos = where[p["id"]]
        chosen[pos], rank[pos] = True, int(p["rank"])
        if p.get("score") is not None:
            score[pos] = float(p["score"])
    rest = positions[~chosen[positions]]
    rank[rest] = int(chosen.sum()) + np.arange(rest.size)
    out = table.copy()
    out["score"] = score
    out["rank"] = pd.array([int(r) if r >= 0 else None for r in rank], dtype="Int64")
    out["selected"] = chosen
    out["value"] = value
    return out


def add_groups(frame: Any, groups: Mapping[str, Mapping[str, str]]) -> Any:
    """Add the composition's group columns (``source``, ``file``, ``template``) to ``frame``."""
    ids = frame["id"].astype(str)
    for axis in ("source", "file", "template"):
        labels = groups.get(axis) or {}
        if axis == "file" and len(set(labels.values())) < 2:
            continue  # one shard: nothing to tell
        frame[axis] = [labels.get(i) for i in ids]
    return frame


def write_scores(frame: Any, path: Path) -> Path:
    """``frame`` as parquet (atomically); NaN scores are stored as nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grads.io import atomic_path

    tbl = pa.Table.from_pandas(frame, preserve_index=False)
    cols = {}
    for name in ("score", "value"):
        col = tbl.column(name).to_numpy(zero_copy_only=False)
        cols[name] = pa.array(col, mask=~np.isfinite(col), type=pa.float64())
    for name, arr in cols.items():
        tbl = tbl.set_column(tbl.schema.get_field_index(name), name, arr)
    with atomic_path(path) as tmp:
        pq.write_table(tbl, tmp)
    return path
