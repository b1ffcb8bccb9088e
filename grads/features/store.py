"""What the features stage stores: the features table (``features.parquet``: its columns, its
writer, the ``features.source`` check) and the representation files of the targeted baselines,
with the chunks a stopped representation pass resumes from.

It sits below both writers (the features pass, :mod:`grads.features.compute`, and the warm-up's
recording, :mod:`grads.training.data`) and the readers (:mod:`grads.selectors`), so neither needs
the other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


BASE_COLUMNS = ("id", "loss", "n_tokens", "embed", "lm_head")


def check_ifd_answer(value: object) -> None:
    if value not in IFD_ANSWERS:
        raise ValueError(f"features.ifd_answer={value!r}: expected one of {IFD_ANSWERS}")


IFD_ANSWERS = ("text", "matched")
SOURCES = ("pass", "warmup")


def features_source(cfg: dict) -> str:
    """``features.source`` (``pass`` | ``warmup``), checked before any model is loaded.

    ``warmup`` records the table during the warm-up (``grads.training.data.FeatureRecording``). IFD needs a
    forward over each response alone, which a training step does not run, so it requires
    ``pass``.
    """
    f = (cfg or {}).get("features") or {}
    check_ifd_answer(f.get("ifd_answer", "text"))
    src = f.get("source") or "pass"
    if src not in SOURCES:
        raise ValueError(f"features.source={src!r}: expected one of {SOURCES}")
    if src == "warmup" and f.get("ifd") is True:
        raise ValueError(
            "features.source=warmup records gradient norms during the warm-up and cannot compute "
            "IFD (a separate forward over each response): use features.source=pass for IFD "
            "selectors, or features.ifd=false"
        )
    return src


def feature_columns(tied: bool, stats: bool, ifd: bool) -> list[str]:
    """Column order of ``features.parquet``."""
    from grads.features.gradients import STAT_KEYS

    columns = list(BASE_COLUMNS) + (["tied"] if tied else [])
    columns += list(STAT_KEYS) if stats else []
    return columns + (["response_loss", "ifd"] if ifd else [])


def feature_schema(columns: Sequence[str]):
    """Arrow schema of ``features.parquet``: ``id`` string, ``n_tokens`` int64, every other column
    float64 (the types Arrow infers from whole rows, fixed so that every chunk agrees)."""
    import pyarrow as pa

    types = {"id": pa.string(), "n_tokens": pa.int64()}
    return pa.schema([(c, types.get(c, pa.float64())) for c in columns])


def arrow_table(rows: list[dict], columns: list[str], schema=None):
    """The rows as an Arrow table of ``columns`` (types inferred, or ``schema``'s)."""
    import pyarrow as pa

    if schema is None:
        return pa.table({c: [row[c] for row in rows] for c in columns})
    return pa.table(
        {c: pa.array([row[c] for row in rows], type=schema.field(c).type) for c in columns},
        schema=schema,
    )


class NanReport:
    """Samples without a supervised token and rows holding a NaN, counted chunk by chunk."""

    KEEP_IDS = 100  # ids kept for the summary

    def __init__(self) -> None:
        self.n_empty = 0
        self.empty_ids: list = []
        self.n_nan_rows = 0

    def add(self, rows: list[dict]) -> NanReport:
        empty = [row["id"] for row in rows if row["n_tokens"] == 0]
        self.n_empty += len(empty)
        self.empty_ids += empty[: self.KEEP_IDS - len(self.empty_ids)]
        self.n_nan_rows += sum(
            any(isinstance(v, float) and math.isnan(v) for v in row.values()) for row in rows
        )
        return self

    def summary(self) -> dict:
        """The summary fields (the warning about samples with no supervised token is logged here)."""
        if self.n_empty:
            log.warning(
                "%d sample(s) have no supervised token; their features are NaN (e.g. %s)",
                self.n_empty,
                self.empty_ids[:5],
            )
        return {
            "n_no_supervised_tokens": self.n_empty,
            "no_supervised_ids": list(self.empty_ids),
            "n_nan_rows": self.n_nan_rows,
        }


def nan_report(rows: list[dict]) -> dict:
    return NanReport().add(rows).summary()


class TableWriter:
    """``features.parquet`` written chunk by chunk (one row group per :meth:`write`) under a
    temporary name in the same folder, renamed onto ``path`` when the block ends without error: a
    crash never leaves a partial table under the final name (as ``grads.io.write_parquet``).

    Usage: ``with TableWriter(path, columns) as w: w.write(rows); ...``; ``schema`` (an Arrow
    schema of ``columns``) replaces the features table's, for other tables written this way.
    """

    def __init__(self, path: str | Path, columns: Sequence[str], schema: Any = None) -> None:
        self.path, self.columns = Path(path), list(columns)
        self.schema = schema if schema is not None else feature_schema(self.columns)
        self.rows = 0

    def __enter__(self) -> TableWriter:
        import pyarrow.parquet as pq

        from grads.io import atomic_path

        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            writer = pq.ParquetWriter(tmp, self.schema)
            stack.callback(writer.close)  # the footer, before the rename (stacks unwind LIFO)
            self._writer, self._stack = writer, stack.pop_all()
        return self

    def write(self, rows: list[dict]) -> None:
        """Append ``rows`` (dicts with every column) as one row group."""
        self.write_table(arrow_table(rows, self.columns, self.schema))

    def write_table(self, table) -> None:
        """Append an Arrow table (or record batch) holding the columns, in any order."""
        import pyarrow as pa

        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self._writer.write_table(table.select(self.columns).cast(self.schema))
        self.rows += table.num_rows

    def __exit__(self, *exc) -> bool:
        # closes the writer, then renames the temporary onto the path (removes it if the block raised)
        return self._stack.__exit__(*exc)


def write_recorded(
    out_dir: str | Path, rows: list[dict], tied: bool, pool_size: int, extra: dict | None = None
) -> dict:
    """Write the warm-up's recorded table (``features.parquet`` / ``features.json``) in ``out_dir``.

    Args:
        out_dir: the warm-up's folder.
        rows: one dict per recorded sample, in pool order, with every column of
            ``feature_columns(tied, stats=True, ifd=False)``.
        tied: whether the model ties its embedding and LM head.
        pool_size: samples in the pool (more than ``len(rows)`` with ``warmup.fraction < 1``).
        extra: further summary fields.

    Returns:
        The summary written to ``features.json``.
    """
    from grads.io import write_json, write_parquet

    columns = feature_columns(tied, stats=True, ifd=False)
    summary = {
        "source": "warmup",
        "n_samples": len(rows),
        "n_recorded": len(rows),
        "pool_size": pool_size,
        **nan_report(rows),
        "columns": columns,
        "tied": tied,
        "stats": True,
        "ifd": False,
        **(extra or {}),
    }
    out_dir = Path(out_dir)
    write_parquet(out_dir / "features.parquet", arrow_table(rows, columns))
    write_json(out_dir / "features.json", summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------
def write_representation(folder: str | Path, rep) -> Path:
    """Write a :class:`~grads.features.store.Representation` as ``npy`` + ``json`` files, atomically."""
    from grads.io import atomic_path, write_json

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / "pool.npy", np.ascontiguousarray(rep.pool, dtype=np.float32))
        write_json(tmp / "pool_ids.json", [str(i) for i in rep.pool_ids])
        if rep.target is not None:
            np.save(tmp / "target.npy", np.ascontiguousarray(rep.target, dtype=np.float32))
            write_json(tmp / "target_ids.json", [str(i) for i in rep.target_ids])
            write_json(tmp / "target_groups.json", [str(g) for g in rep.target_groups])
        write_json(tmp / "meta.json", {"name": rep.name, **rep.meta})
    return folder


def read_representation(folder: str | Path, name: str | None = None):
    """Open a stored representation (matrices memory-mapped, read-only)."""
    from grads.io import read_json

    folder = Path(folder)
    if not (folder / "pool.npy").exists():
        raise FileNotFoundError(f"no stored representation in {folder} (pool.npy missing)")
    meta = read_json(folder / "meta.json")
    has_target = (folder / "target.npy").exists()
    return Representation(
        name=str(name or meta.get("name") or folder.name),
        pool_ids=np.array(read_json(folder / "pool_ids.json"), dtype=object),
        pool=np.load(folder / "pool.npy", mmap_mode="r"),
        target_ids=np.array(read_json(folder / "target_ids.json"), dtype=object)
        if has_target
        else None,
        target=np.load(folder / "target.npy", mmap_mode="r") if has_target else None,
        target_groups=np.array(read_json(folder / "target_groups.json"), dtype=object)
        if has_target
        else None,
        meta=meta,
    )


def load_representations(features_dir: str | Path, names: Sequence[str]) -> dict:
    """``{name: Representation}`` for the passes a selector reads, from a features stage folder."""
    root = Path(features_dir) / "representations"
    out = {}
    for name in names:
        if not (root / name / "pool.npy").exists():
            raise FileNotFoundError(
                f"{root / name}: the features stage did not compute the {name!r} representation; "
                f"it runs when the selector declares it (or features.representations lists it)"
            )
        out[name] = read_representation(root / name, name)
    return out


@dataclass
class Representation:
    """Per-sample vectors of one representation pass (rows in the order of their ids).

    Attributes:
        name: the pass (``lora_grads``, ``hidden``).
        pool_ids: ids of the pool rows.
        pool: ``[n_pool, d]`` float32 matrix (usually memory-mapped).
        target_ids: ids of the target rows (``None`` when the pass embedded no target set).
        target: ``[n_target, d]`` float32 matrix or ``None``.
        target_groups: one group label per target row (its evaluation task / source).
        meta: facts about the pass (model, projection, dimension, preconditioning, timings).
    """

    name: str
    pool_ids: np.ndarray
    pool: np.ndarray
    target_ids: np.ndarray | None = None
    target: np.ndarray | None = None
    target_groups: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool.ndim != 2 or self.pool.shape[0] != len(self.pool_ids):
            raise ValueError(
                f"representation {self.name!r}: pool matrix {self.pool.shape} does not match "
                f"{len(self.pool_ids)} ids"
            )
        if self.target is not None:
            if self.target.ndim != 2 or self.target.shape[1] != self.pool.shape[1]:
                raise ValueError(
                    f"representation {self.name!r}: target matrix {self.target.shape} does not "
                    f"match the pool dimension {self.pool.shape[1]}"
                )
            n_t = self.target.shape[0]
            if self.target_ids is None or len(self.target_ids) != n_t:
                raise ValueError(f"representation {self.name!r}: target ids do not match rows")
            if self.target_groups is None:
                self.target_groups = np.array(["target"] * n_t, dtype=object)
            elif len(self.target_groups) != n_t:
                raise ValueError(f"representation {self.name!r}: one group per target row")


# --------------------------------------------------------------------------------------------------
# Resuming the representation passes
# --------------------------------------------------------------------------------------------------
# finished chunks of an attempt's pool passes (``<name>/<start>.npz``), kept until every pass is stored
REP_CHUNK_DIR = "representations.chunks"


def finished_representation(folder: Path, rows: list[dict]) -> dict | None:
    """The meta of a representation an earlier attempt stored in ``folder`` for these rows (the
    same ids in the same order), else None."""
    from grads.io import read_json

    if not (folder / "meta.json").is_file() or not (folder / "pool_ids.json").is_file():
        return None
    if read_json(folder / "pool_ids.json") != [r["id"] for r in rows]:
        return None
    meta = read_json(folder / "meta.json")
    meta.pop("name", None)
    return meta


class PoolChunks:
    """A pool pass run chunk by chunk (``features.chunk_size`` samples, as the features pass), each
    finished chunk saved in ``<attempt>/representations.chunks/<pass>/<start>.npz`` so that a
    stopped attempt resumes from it. A pool that fits one chunk runs in one piece and saves nothing
    (its rows are those of an unchunked pass); in a larger pool the longest-first batches form
    within each chunk, so rows may differ from an unchunked pass by floating-point rounding."""

    def __init__(self, root: Path, chunk_size: Any) -> None:
        self.root = root
        self.size = int(chunk_size) if chunk_size else None

    def run(self, name: str, rows: list[dict], compute, label: str | None):
        """``compute(samples, bar label) -> (matrix [n, d], norms [n] or None)`` over ``rows``;
        returns the whole pool's ``(matrix, norms, samples resumed)``."""
        size = self.size or len(rows)
        if len(rows) <= size:
            return (*compute(rows, label), 0)
        starts = range(0, len(rows), size)
        mats, norms, resumed = [], [], 0
        for k, start in enumerate(starts):
            part = rows[start : start + size]
            ids = [r["id"] for r in part]
            saved = self._load(name, start, ids)
            if saved is None:
                bar = f"{label} {k + 1}/{len(starts)}" if label else None
                saved = compute(part, bar)
                self._save(name, start, ids, *saved)
            else:
                resumed += len(part)
            mats.append(saved[0])
            norms.append(saved[1])
        if resumed:
            log.info(
                "representation %s: %d of %d samples from saved chunks", name, resumed, len(rows)
            )
        norm = None if norms[0] is None else np.concatenate(norms)
        return np.concatenate(mats), norm, resumed

    def _path(self, name: str, start: int) -> Path:
        return self.root / name / f"{start:012d}.npz"

    def _load(self, name: str, start: int, ids: list[str]):
        path = self._path(name, start)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            if z["ids"].tolist() != ids:  # another pool's chunk: computed again
                log.warning("representation %s: saved chunk %s is of other samples", name, path)
                return None
            return z["matrix"], (z["norms"] if "norms" in z.files else None)

    def _save(self, name: str, start: int, ids: list[str], matrix, norms) -> None:
        from grads.io import atomic_path

        path = self._path(name, start)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"ids": np.array(ids, dtype=str), "matrix": matrix}
        if norms is not None:
            arrays["norms"] = norms
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
