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

Memory does not follow the pool: the ranking reads only the selector's columns, the new columns
are numpy arrays (about 25 bytes per sample), and the file is written a row group at a time from
the features table's own row groups (:data:`BATCH_ROWS` rows each).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536  # features-table rows read and written at a time
GROUP_AXES = ("source", "file", "template")


def features_path(summary: Mapping) -> Path | None:
    """The features table a selection was made from (``selection.json``), if it still exists."""
    path = summary.get("features_path")
    return Path(str(path)) if path and Path(str(path)).exists() else None


def rank_pool(cfg: Mapping, path: Path, seed: int) -> Any:
    """The run's selector's ranking of every sample of the features table ``path`` it can score
    (read with only the columns the selector uses)."""
    from hydra.utils import instantiate

    from grads.selectors.balance import ranking
    from grads.selectors.base import ID, traits
    from grads.selectors.stage import read_features

    selector = instantiate(cfg["selector"])
    table = read_features(path, [ID, *selector.columns])
    names = traits(selector).representations
    reps = None
    if names:
        from grads.features.store import load_representations

        reps = load_representations(path.parent, names)
    return ranking(selector, table, seed, reps)


@dataclass
class PoolScores:
    """The columns ``scores.parquet`` adds to the features table, aligned with its rows."""

    score: np.ndarray  # float64; NaN: not scored
    rank: np.ndarray  # int64; -1: not scored
    selected: np.ndarray  # bool
    value: np.ndarray  # float64; NaN: none shown


def iter_ids(path: Path, batch_rows: int | None = None) -> Iterator[Any]:
    """The features table's ``id`` column, a pyarrow string array per batch of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=["id"])
    for batch in batches:
        yield batch.column(0).cast(pa.string())


def positions_of(path: Path, ids: Sequence[str]) -> np.ndarray:
    """The row of each of ``ids`` in the features table ``path`` (-1: absent), in one streamed pass
    over its ``id`` column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(list(ids), type=pa.string())
    rows = np.full(len(wanted), -1, dtype=np.int64)
    offset = 0
    for batch in iter_ids(path):
        hit = pc.index_in(batch, value_set=wanted).fill_null(-1).to_numpy(zero_copy_only=False)
        where = np.flatnonzero(hit >= 0)
        rows[hit[where]] = offset + where
        offset += len(batch)
    return rows


def pool_scores(path: Path, picks: Sequence[Mapping], ranked: Any) -> PoolScores:
    """Score, rank, selected and value of every row of the features table ``path`` (docstring).

    Args:
        path: the features table, one row per pool sample.
        picks: ``selection.jsonl`` rows (``id``, ``rank``, ``score``).
        ranked: :func:`rank_pool` of ``path``.

    Raises:
        RuntimeError: a selected id is not in the features table.
    """
    import pyarrow.parquet as pq

    n = pq.ParquetFile(path).metadata.num_rows
    picks = sorted(picks, key=lambda p: p["rank"])
    rows = positions_of(path, [p["id"] for p in picks])
    missing = [p["id"] for p, r in zip(picks, rows) if r < 0]
    if missing:
        raise RuntimeError(
            f"export: {len(missing)} selected ids are not in the features table (first: "
            f"{missing[:3]}); the selection and the features stage disagree: re-run selection"
        )
    out = PoolScores(
        score=np.full(n, np.nan),
        rank=np.full(n, -1, dtype=np.int64),
        selected=np.zeros(n, dtype=bool),
        value=np.full(n, np.nan),
    )
    positions = np.asarray(ranked.positions, dtype=np.int64)
    out.score[positions] = np.asarray(ranked.scores, dtype=np.float64)
    shown = np.atleast_1d(np.asarray(ranked.artifacts.get("selected_values", []), dtype=float))
    if shown.size == positions.size:
        out.value[positions] = shown
    out.selected[rows] = True
    out.rank[rows] = [int(p["rank"]) for p in picks]
    given = np.array([p.get("score") is not None for p in picks], dtype=bool)
    out.score[rows[given]] = [float(p["score"]) for p, g in zip(picks, given) if g]
    rest = positions[~out.selected[positions]]
    out.rank[rest] = int(out.selected.sum()) + np.arange(rest.size)
    return out


def pool_view(
    path: Path, records: Mapping[str, Any], sampled: Sequence[str] | None
) -> tuple[list[str], dict[str, Any] | None]:
    """What the composition reads from the features table, in one streamed pass: the pool's ids in
    table order (those of ``sampled`` only, when the pool was sampled) and the supervised tokens
    (``n_tokens``) of the ids in ``records`` (``None`` without that column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    columns = ["id", *(["n_tokens"] if "n_tokens" in file.schema_arrow.names else [])]
    keep = set(sampled) if sampled is not None else None
    ids: list[str] = []
    n_tokens: dict[str, Any] | None = {} if len(columns) > 1 else None
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        batch_ids = batch.column(0).cast(pa.string()).to_pylist()
        ids.extend(i for i in batch_ids if keep is None or i in keep)
        if n_tokens is not None:
            counts = batch.column(1).to_numpy(zero_copy_only=False).tolist()
            n_tokens.update((i, n) for i, n in zip(batch_ids, counts) if i in records)
    return ids, n_tokens


def plot_artifacts(ranked: Any) -> dict[str, Any]:
    """What the selection figure needs of a ranking: the axis label, KDE curve and threshold."""
    keys = ("xlabel", "grid", "density", "threshold")
    return {k: ranked.artifacts[k] for k in keys if k in ranked.artifacts}


def group_axes(groups: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The composition's group columns that ``scores.parquet`` carries (``file`` only for a pool
    of several shards)."""
    return [
        axis
        for axis in GROUP_AXES
        if not (axis == "file" and len(set((groups.get(axis) or {}).values())) < 2)
    ]


def write_scores(
    features: Path,
    scores: PoolScores,
    groups: Mapping[str, Mapping[str, str]],
    path: Path,
    batch_rows: int | None = None,
) -> Path:
    """``scores.parquet`` (atomically): the features table ``features`` a batch of rows at a time,
    with the columns of ``scores`` and the composition's ``groups`` (``{axis: {id: label}}``; ids
    without a label are null). NaN scores and values are stored as nulls."""
    import itertools

    from grads.features.store import TableWriter
    from grads.io import release_memory

    parts = _scored_batches(features, scores, groups, batch_rows or BATCH_ROWS)
    first = next(parts, None)
    if first is None:
        raise ValueError(f"export: the features table {features} has no rows")
    schema = first.schema.with_metadata(_pandas_metadata(first))
    with TableWriter(path, schema.names, schema) as writer:
        for table in itertools.chain([first], parts):
            writer.write_table(table)
    release_memory()  # the batches' buffers, kept for reuse
    return path


def _scored_batches(
    features: Path, scores: PoolScores, groups: Mapping, batch_rows: int
) -> Iterator[Any]:
    """The rows of ``scores.parquet``, an Arrow table per batch of the features table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    axes, offset = group_axes(groups), 0
    for batch in pq.ParquetFile(features).iter_batches(batch_size=batch_rows):
        part = slice(offset, offset + batch.num_rows)
        offset += batch.num_rows
        yield _with_scores(pa.Table.from_batches([batch]), scores, part, groups, axes)


def _with_scores(
    table: Any, scores: PoolScores, part: slice, groups: Mapping, axes: Sequence[str]
) -> Any:
    """One batch of ``scores.parquet``: the features rows plus the added columns."""
    import pyarrow as pa

    table = table.replace_schema_metadata(None)
    score, value, rank = scores.score[part], scores.value[part], scores.rank[part]
    added = {
        "score": pa.array(score, mask=~np.isfinite(score), type=pa.float64()),
        "rank": pa.array(rank, mask=rank < 0, type=pa.int64()),
        "selected": pa.array(scores.selected[part], type=pa.bool_()),
        "value": pa.array(value, mask=~np.isfinite(value), type=pa.float64()),
    }
    ids = table.column("id").cast(pa.string()).to_pylist()
    for axis in axes:
        labels = groups.get(axis) or {}
        added[axis] = pa.array([labels.get(i) for i in ids], type=pa.string())
    for name, column in added.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, column)
    return table


def _pandas_metadata(table: Any) -> dict:
    """pandas' schema metadata for ``table`` with ``rank`` as nullable ``Int64``, so that
    ``pd.read_parquet`` gives integer ranks (and ``<NA>`` where a sample is not scored)."""
    import pyarrow as pa

    frame = table.slice(0, 1).to_pandas()
    frame["rank"] = frame["rank"].astype("Int64")
    return pa.Schema.from_pandas(frame, preserve_index=False).metadata
