"""Which pool rows a run trains on (the fine-tune's ids, the warm-up's seeded subset), their token
counts, and the warm-up's recording of the features table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from grads.training.schedule import BatchPlan
from grads.training.settings import WARMUP_IDS_NAME, TrainerSettings
from grads.training.steps import supervised_count


def pool_ids_of(pool) -> Sequence[str]:
    """The pool's ids in order: a list, or for a ``datasets.Dataset`` a :class:`IdColumn` read
    from its Arrow table (no Python string per row until one is asked for)."""
    if hasattr(pool, "column_names"):
        return IdColumn(pool)
    return [str(r["id"]) for r in pool]


class IdColumn(Sequence):
    """The ``id`` column of a (memory-mapped) dataset as a sequence of strings."""

    def __init__(self, pool) -> None:
        self.column = pool.with_format("arrow")[:]["id"] if len(pool) else None
        self.n = len(pool)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        return str(self.column[int(i)])

    def __iter__(self):
        for chunk in self.column.chunks if self.column is not None else []:
            yield from (str(x) for x in chunk.to_pylist())

    def take(self, positions) -> list[str]:
        """The ids at ``positions`` (any integer sequence), in that order."""
        import pyarrow as pa

        positions = pa.array(list(positions), pa.int64())
        return [str(x) for x in self.column.take(positions).to_pylist()]


def warmup_subset(
    pool_ids: Sequence[str], fraction: float, max_samples: int | None, seed: int
) -> list[str] | None:
    """The warm-up's seeded random subset of the pool (``warmup.fraction`` / ``max_samples``).

    Keeps ``k = min(ceil(fraction * n), max_samples)`` ids (at least one): the first ``k`` of a
    permutation drawn from ``(seed, 15)``, returned in pool order, so the subset is a function of
    the pool, the knobs and the seed only. ``None`` when ``k`` covers the whole pool (LESS warms
    up on 5% of its pool; the GrADS paper on all of it).
    """
    import numpy as np

    n = len(pool_ids)
    k = max(1, math.ceil(float(fraction) * n))
    if max_samples is not None:
        k = min(k, int(max_samples))
    if k >= n:
        return None
    keep = np.sort(np.random.default_rng([int(seed), 15]).permutation(n)[:k]).tolist()
    if hasattr(pool_ids, "take"):
        return pool_ids.take(keep)
    return [pool_ids[i] for i in keep]


def write_subset(out: Path, s: TrainerSettings, row_ids: list[str], n_pool: int) -> dict:
    """Record the warm-up's subset (``warmup_ids.json``); return its summary entry."""
    from grads.io import write_json

    info = {
        "fraction": float(s.fraction),
        "max_samples": s.max_samples,
        "seed": s.seed,
        "n_pool": n_pool,
        "n": len(row_ids),
        "ids_file": WARMUP_IDS_NAME,
    }
    write_json(out / WARMUP_IDS_NAME, {**info, "ids": list(row_ids)})
    return info


class FeatureRecording:
    """``features.source: warmup``: the warm-up writes the features table itself.

    Each trained sample's gradient norms are read at its *last* visit (so with one epoch, its only
    one), from that micro-batch's own forward and backward (``grads.features.gradients.GradNormRecorder``),
    before the optimizer step. Rows survive a restart in the checkpoints' ``extra.pt`` and are
    gathered on rank 0, which writes ``features.parquet`` / ``features.json`` next to the model.
    """

    def __init__(self, module, cfg: dict, plan: BatchPlan, total: int, row_ids: list[str]):
        from grads.features.gradients import GradNormRecorder

        chunk = int(((cfg.get("features") or {}).get("chunk_bytes")) or (1 << 26))
        # Statistics always: they are cheap here, and the cached warm-up serves either setting.
        self.rec = GradNormRecorder(module, stats=True, chunk_bytes=chunk)
        self.last = plan.last_visits(total)
        self.row_ids = row_ids
        self.rows: dict[str, dict] = {}
        self.time_s = 0.0

    def wanted(self, micro: Sequence[int], step: int) -> list[int]:
        """Slots of ``micro`` whose sample is visited for the last time at ``step``."""
        return [k for k, i in enumerate(micro) if self.last.get(i) == step]

    def arm(self) -> None:
        self.rec.arm()

    def collect(self, batch: dict, scale: float, micro: Sequence[int], want: list[int]) -> None:
        t0 = time.perf_counter()
        cols = {k: v.tolist() for k, v in self.rec.collect(batch, scale).items()}
        for k in want:
            sid = self.row_ids[micro[k]]
            self.rows[sid] = {"id": sid, **{c: v[k] for c, v in cols.items()}}
        self.time_s += time.perf_counter() - t0

    def gather(self) -> dict[str, dict] | None:
        """Every rank's rows, on rank 0 (``None`` on the others). A collective."""
        import torch.distributed as tdist

        if not (tdist.is_initialized() and tdist.get_world_size() > 1):
            return dict(self.rows)
        parts = [None] * tdist.get_world_size() if tdist.get_rank() == 0 else None
        tdist.gather_object(self.rows, parts, dst=0)
        if parts is None:
            return None
        return {k: v for part in parts for k, v in part.items()}

    def write(self, out: Path, recorded: dict[str, dict], pool_ids: list[str]) -> dict:
        """Rank 0: the table in pool order (recorded ids only); returns ``features.json``."""
        from grads.features.store import write_recorded

        rows = [recorded[i] for i in pool_ids if i in recorded]
        return write_recorded(
            out,
            rows,
            tied=self.rec.tied,
            pool_size=len(pool_ids),
            extra={
                "record_time_s_rank0": self.time_s,
            },
        )

    def close(self) -> None:
        self.rec.close()


def select_rows(pool, ids: Sequence[str] | None) -> list[int]:
    """Row positions of ``ids`` in ``pool`` (all rows when ``ids`` is None), in pool order."""
    if ids is None:
        return list(range(len(pool)))
    wanted = {str(i) for i in ids}
    if hasattr(pool, "column_names") and len(pool):  # Arrow: match without a string per row
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        column = IdColumn(pool)
        mask = pc.is_in(column.column, value_set=pa.array(sorted(wanted), pa.string()))
        rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False)).tolist()
        found = set(column.take(rows))
    else:
        all_ids = [str(r["id"]) for r in pool]
        rows = [i for i, x in enumerate(all_ids) if x in wanted]
        found = {all_ids[i] for i in rows}
    if len(found) != len(wanted):
        missing = sorted(wanted - found)
        raise KeyError(f"{len(missing)} selected id(s) are not in the pool, e.g. {missing[:5]}")
    if len(rows) != len(found):
        raise ValueError("the pool has duplicate ids; ids must be unique")
    return rows


def row_stats(pool, rows: list[int]) -> tuple[list[str], list[int], list[int]]:
    """Ids, token counts and supervised-token counts of the selected rows, in one pass."""
    if hasattr(pool, "select") and hasattr(pool, "iter"):  # datasets.Dataset: read in batches
        ids, n_tok, n_sup = [], [], []
        sub = pool.select(rows).select_columns(["id", "input_ids", "labels"])
        for b in sub.iter(batch_size=1024):
            ids += [str(x) for x in b["id"]]
            n_tok += [len(x) for x in b["input_ids"]]
            n_sup += [supervised_count(x) for x in b["labels"]]
        return ids, n_tok, n_sup
    picked = [pool[i] for i in rows]
    return (
        [str(r["id"]) for r in picked],
        [len(r["input_ids"]) for r in picked],
        [supervised_count(r["labels"]) for r in picked],
    )
