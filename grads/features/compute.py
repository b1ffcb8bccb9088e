"""The ``features`` stage: per-sample gradient features of a candidate pool, written to parquet.

For every pool sample this computes the exact per-sample gradient norms of the embedding and LM head
(``grads.features.gradients.per_sample_grad_norms``), per-token statistics and, optionally, Cherry-LLM's
instruction-following difficulty (Li et al., 2024)

    IFD(q, a) = PPL(a | q) / PPL(a) = exp(L(a | q) - L(a)),

with ``L(a | q)`` the loss of the normal pass (prompt masked) and ``L(a)`` a forward-only pass over the
response tokenised alone (loss on every token but the first).

Outputs in ``out_dir``: ``features.parquet`` (one row per sample, in pool order) and ``features.json``
(counts, NaN rows, timings, throughput). Parquet columns:

* ``id`` (str), ``loss`` (mean CE over supervised tokens), ``n_tokens`` (int, supervised tokens),
  ``embed`` (``||dL_i/dE||_F``), ``lm_head`` (``||dL_i/dW||_F``), ``tied`` (tied models only:
  norm of the shared matrix's total gradient);
* with ``features.stats`` (default on): ``embed_tok_{mean,std,max}`` and ``head_tok_{mean,std,max}``
  (see ``grads.features.gradients.per_sample_grad_norms``);
* with ``features.ifd``: ``response_loss`` (``L(a)``) and ``ifd``.

With ``features.source: warmup`` the warm-up writes these rows itself, from its own training steps
(``grads.features.gradients.GradNormRecorder``; same maths and schema, no IFD), and ``features_from_warmup``
takes them over, running this pass only for samples the warm-up did not train on.

A sample with no supervised token has ``n_tokens = 0`` and NaN in every float column; it is counted in
the summary (``n_no_supervised_tokens``) and logged as a warning.

The pass works through the pool in chunks of ``features.chunk_size`` samples, in pool order, so that
memory holds one chunk's rows, never the pool's: within a chunk the samples still to score are
sorted by length (longest first, ties by index) and batched; under ``torch.distributed`` each rank
scores its share of the chunk (``rank::world`` of those samples, read from the pool by that rank
alone), rank 0 gathers the chunk's rows and appends them to ``features.parquet`` (one row group per
chunk, under a temporary name renamed at the end). The table equals a single-process run up to
float rounding (batches differ in padding); a pool no larger than a chunk is sorted and batched as
one.

**Resuming.** Each finished chunk is also saved as ``features.chunks/<start>.parquet`` in the
stage's folder. A pass that is killed or fails keeps them (the stage cache adopts the folder, see
:data:`grads.cache.RESUMABLE`), and the next attempt takes every saved chunk whose ids are the
pool's ids at that place instead of scoring it again; the folder is removed once the table is in
place. ``features.chunk_size`` (default :data:`CHUNK_SIZE`) sets how much a kill can lose.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

from grads.constants import IGNORE_INDEX  # noqa: E402
from grads.data.pool import collate  # noqa: E402  (grads.data.pool imports no torch at module level)
from grads.features.store import (  # noqa: E402
    NanReport,
    TableWriter,
    check_ifd_answer,
    feature_columns,
    features_source,
)

# Samples per chunk of the pass: the rows rank 0 holds at once, one row group of the table and
# the unit a killed pass resumes from. The longest-first sort (padding waste) works within a chunk;
# 4,096 samples keep it near the whole-pool sort, a chunk's rows at a few MB, and what a kill loses
# at about an hour of SmolLM2 on two CPU cores (minutes on a GPU).
CHUNK_SIZE = 4_096
CHUNK_DIR = "features.chunks"  # finished chunks of an attempt, kept until the table is in place
TIMINGS = ("feature_s", "ifd_s", "wall_s", "tokens", "supervised_tokens", "samples")


def _arrow_view(pool: Any):
    """A ``datasets.Dataset`` pool's ``id`` and ``input_ids`` columns, Arrow-formatted (``None``
    for any other pool, e.g. a list of dicts)."""
    if not hasattr(pool, "with_format"):
        return None
    return pool.select_columns(["id", "input_ids"]).with_format("arrow")


def chunk_ids_and_lengths(pool: Any, view: Any, start: int, stop: int):
    """Ids (an Arrow string array) and ``len(input_ids)`` (int64 numpy) of ``pool[start:stop]``.

    A ``datasets.Dataset`` is read through Arrow (``view``: :func:`_arrow_view`): the lengths come
    from the list offsets, no token becomes a Python object.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if view is None:
        rows = [pool[i] for i in range(start, stop)]
        ids = pa.array([str(row["id"]) for row in rows], type=pa.string())
        return ids, np.array([len(row["input_ids"]) for row in rows], dtype=np.int64)
    table = view[start:stop]
    ids = table.column("id")
    if not pa.types.is_string(ids.type):
        ids = pc.cast(ids, pa.string())
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    return ids.combine_chunks(), lengths.astype(np.int64)


def batch_order(indices: list[int], lengths: Any) -> list[int]:
    """``indices`` longest first (``lengths[i]``), ties by index: padding waste is minimal within a
    batch and memory trouble shows up at once."""
    return sorted(indices, key=lambda i: (-lengths[i], i))


def features_settings(cfg: dict) -> dict:
    from grads.config_access import defaults  # the defaults live in conf/config.yaml only

    f = {**defaults("features"), **dict((cfg or {}).get("features") or {})}
    if f["ifd"] == "auto":  # the pipeline resolves auto from the selector; a direct call has none
        f["ifd"] = False
    if str(f["ifd_answer"]).startswith("${"):  # the YAML default, unresolved: the domain's or text
        f["ifd_answer"] = ((cfg or {}).get("domain") or {}).get("ifd_answer", "text")
    check_ifd_answer(f["ifd_answer"])
    return f


def ifd_reference(samples: list[dict], how: str, prefix_id: int) -> list[dict]:
    """The sequences whose loss is IFD's s(A), one per sample (``features.ifd_answer``).

    ``text``: the answer tokenised alone (``response_ids``). ``matched``: ``prefix_id`` (BOS) then
    exactly the tokens the conditioned loss s(A|Q) scores (label != -100 after the shift), so that
    every one of them is scored in both losses, a one-token answer included.
    """
    if how == "text":
        return [{"input_ids": r["response_ids"]} for r in samples]
    out = []
    for r in samples:
        scored = [
            t for t, y in zip(r["input_ids"][1:], r["labels"][1:], strict=True) if y != IGNORE_INDEX
        ]
        out.append({"input_ids": [prefix_id, *scored], "labels": [IGNORE_INDEX, *scored]})
    return out


def _score_batch(fcfg: dict, model, samples: list[dict], pad_id: int, padding_side: str,
                 prefix_id: int | None) -> tuple[dict, dict, dict]:  # fmt: skip
    """One batch: its feature columns (lists), the collated batch and seconds per part."""
    from grads.features.gradients import per_sample_grad_norms, per_sample_loss

    batch = collate(samples, pad_id, padding_side)
    t0 = time.perf_counter()
    res = per_sample_grad_norms(
        model, **batch, stats=bool(fcfg["stats"]), chunk_bytes=int(fcfg["chunk_bytes"])
    )
    secs = {"feature_s": time.perf_counter() - t0, "ifd_s": 0.0}
    cols = {k: v.tolist() for k, v in res.items()}
    if fcfg["ifd"]:
        t0 = time.perf_counter()
        refs = ifd_reference(samples, fcfg["ifd_answer"], prefix_id)
        resp = collate(refs, pad_id, padding_side)
        loss_a, _ = per_sample_loss(model, **resp, chunk_bytes=int(fcfg["chunk_bytes"]))
        secs["ifd_s"] = time.perf_counter() - t0
        cols["response_loss"] = loss_a.tolist()
        cols["ifd"] = [
            math.exp(lq - la) if math.isfinite(lq - la) else math.nan
            for lq, la in zip(cols["loss"], cols["response_loss"])
        ]
    return cols, batch, secs


def compute_shard(
    fcfg: dict,
    model,
    pad_id: int,
    padding_side: str,
    pool: Any,
    indices: list[int],
    progress: bool = True,
    prefix_id: int | None = None,
    lengths: Any = None,
    bar: Any = None,
) -> tuple[list[tuple[int, dict]], dict]:
    """Features of ``pool[indices]``, batched by length; returns ``[(pool index, row)]`` and timings.

    ``lengths[i]`` is ``len(pool[i]["input_ids"])`` (read from the pool when not given); ``bar``, a
    progress bar to advance (else one is opened when ``progress``).
    """
    from tqdm.auto import tqdm

    if lengths is None:
        lengths = {i: len(pool[int(i)]["input_ids"]) for i in indices}
    order = batch_order(indices, lengths)
    bs = int(fcfg["batch_size"])
    out: list[tuple[int, dict]] = []
    timings = dict.fromkeys(TIMINGS, 0)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(order), desc="features", unit="sample", disable=not progress,
                   dynamic_ncols=True)  # fmt: skip
    t_start = time.perf_counter()
    for s in range(0, len(order), bs):
        idx = order[s : s + bs]
        samples = [pool[int(i)] for i in idx]
        cols, batch, secs = _score_batch(fcfg, model, samples, pad_id, padding_side, prefix_id)
        for b, i in enumerate(idx):
            out.append((i, {"id": str(samples[b]["id"]), **{k: v[b] for k, v in cols.items()}}))
        timings["feature_s"] += secs["feature_s"]
        timings["ifd_s"] += secs["ifd_s"]
        timings["tokens"] += int(batch["attention_mask"].sum())
        timings["supervised_tokens"] += int(sum(cols["n_tokens"]))
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{timings['tokens'] / max(time.perf_counter() - t_start, 1e-9):.0f}")
    if own_bar:
        bar.close()
    timings["wall_s"] = time.perf_counter() - t_start
    timings["samples"] = len(order)
    return out, timings


def _recorded_table(recorded: Any):
    """The recorded rows as an Arrow table and their ids as strings (``(None, None)``: none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if recorded is None:
        return None, None
    table = recorded if isinstance(recorded, pa.Table) else pa.Table.from_pylist(list(recorded))
    if table.num_rows == 0:
        return None, None
    if "id" not in table.column_names:
        raise ValueError(f"recorded features: no 'id' column (columns: {table.column_names})")
    return table, pc.cast(table.column("id"), pa.string()).combine_chunks()


class _ChunkTable:
    """Rank 0's side of the pass: each chunk's gathered rows, merged in pool order with the
    recorded ones, appended to the table and saved for a later attempt (:data:`CHUNK_DIR`); NaN
    report and counts accumulated on the way."""

    def __init__(self, path: Path, columns: list[str], recorded: Any) -> None:
        self.writer, self.columns, self.recorded = TableWriter(path, columns), columns, recorded
        self.saved_dir = path.parent / CHUNK_DIR
        self.nan = NanReport()
        self.n_rows = self.n_computed = self.n_resumed = 0

    def __enter__(self) -> _ChunkTable:
        self.writer.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        suppress = self.writer.__exit__(*exc)
        if exc[0] is None:  # the table is in place: the saved chunks are not needed any more
            import shutil

            shutil.rmtree(self.saved_dir, ignore_errors=True)
        return suppress

    def saved(self, start: int, stop: int, ids: Any) -> list[dict] | None:
        """The rows of chunk ``[start, stop)`` that an earlier attempt saved, if its ids are ``ids``
        (the pool's at that place, in order); ``None`` otherwise."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._path(start)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("features: ignoring the unreadable saved chunk %s (%s)", path, exc)
            return None
        same = table.num_rows == stop - start and table.column("id").cast(pa.string()).equals(
            pa.chunked_array([ids]).cast(pa.string())
        )
        if not same or not set(self.columns) <= set(table.column_names):
            log.warning("features: ignoring the saved chunk %s: another pool or columns", path)
            return None
        return table.select(self.columns).to_pylist()

    def add(self, start: int, stop: int, parts: list, todo: list[int], positions: Any) -> None:
        """``parts``: every rank's ``[(pool index, row)]`` of the chunk ``[start, stop)``;
        ``positions``: each sample's row in the recorded table (null: not recorded)."""
        import pyarrow.compute as pc

        from grads.features.store import arrow_table
        from grads.io import write_parquet

        computed = dict(item for part in parts for item in part)
        assert sorted(computed) == todo, "lost or duplicated samples"
        rec = iter(())
        if positions is not None:
            rec = iter(self.recorded.take(pc.drop_null(positions)).to_pylist())
        rows = [computed[i] if i in computed else next(rec) for i in range(start, stop)]
        table = arrow_table(rows, self.columns, self.writer.schema)
        self.saved_dir.mkdir(exist_ok=True)
        write_parquet(self._path(start), table)
        self._append(rows, len(todo))

    def add_saved(self, rows: list[dict], n_todo: int) -> None:
        """A chunk an earlier attempt finished (:meth:`saved`), appended as it was."""
        self._append(rows, n_todo)
        self.n_resumed += n_todo

    def _append(self, rows: list[dict], n_todo: int) -> None:
        self.nan.add(rows)
        self.writer.write(rows)
        self.n_rows += len(rows)
        self.n_computed += n_todo

    def _path(self, start: int) -> Path:
        return self.saved_dir / f"{start:012d}.parquet"


def _chunk_todo(ids: Any, start: int, recorded_ids: Any) -> tuple[list[int], Any]:
    """Pool indices of the chunk still to score and each sample's row in the recorded table."""
    import pyarrow.compute as pc

    n = len(ids)
    if recorded_ids is None:
        return list(range(start, start + n)), None
    positions = pc.index_in(ids, value_set=recorded_ids)
    missing = pc.is_null(positions).to_numpy(zero_copy_only=False)
    return [start + int(k) for k in missing.nonzero()[0]], positions


def run_features(
    cfg: dict,
    model,
    tokenizer,
    pool: Any,
    out_dir: str | Path,
    recorded: Any = None,
    chunk_size: int | None = None,
) -> dict:
    """Compute the feature table of ``pool`` and write ``features.parquet`` / ``features.json``.

    Args:
        cfg: resolved config dict; reads ``cfg["features"]``: ``batch_size``, ``ifd`` (add the IFD
            column), ``stats`` (per-token statistics, default true), ``padding_side`` (default: the
            tokenizer's), ``chunk_bytes`` (memory cap of vocabulary-wide buffers), ``progress``.
        model: causal LM (plain or peft-wrapped), on its target device.
        tokenizer: supplies ``pad_token_id`` (``eos_token_id`` if unset) and the padding side.
        pool: ``datasets.Dataset`` or list of dicts with ``id``, ``input_ids``, ``labels`` (``-100`` on
            the prompt) and, with ``ifd``, ``response_ids``.
        out_dir: stage output folder (rank 0 writes).
        recorded: rows already scored (the warm-up's, ``features.source=warmup``), as an Arrow table
            or a list of dicts; only the other pool samples are computed, and the table holds both,
            in pool order.
        chunk_size: samples per chunk (default :data:`CHUNK_SIZE`).

    Returns:
        The summary written to ``features.json`` (identical on every rank).
    """
    import torch.distributed as dist

    from grads.dist import rank, world_size

    fcfg = features_settings(cfg)
    chunk = int(chunk_size or fcfg.get("chunk_size") or CHUNK_SIZE)
    if chunk < 1:
        raise ValueError(f"run_features: chunk_size={chunk_size!r} must be a positive integer")
    padding_side = fcfg.get("padding_side") or getattr(tokenizer, "padding_side", None) or "right"
    r, world = rank(), world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    t0 = time.perf_counter()
    rec_table, rec_ids = _recorded_table(recorded)
    columns = feature_columns(_tied(model), bool(fcfg["stats"]), bool(fcfg["ifd"]))
    table = _ChunkTable(Path(out_dir) / "features.parquet", columns, rec_table) if r == 0 else None
    setup = _Pass(fcfg, model, tokenizer, pool, padding_side, r, world if distributed else 1,
                  chunk, rec_table, rec_ids)  # fmt: skip
    with table or nullcontext():
        timings = _run_chunks(setup, table)
    timings["device"] = str(next(model.parameters()).device)
    if distributed:
        gathered = [None] * world if r == 0 else None
        dist.gather_object(timings, gathered, dst=0)
    else:
        gathered = [timings]
    summary = None
    if r == 0:
        meta = {"padding_side": padding_side, "t0": t0, "source": recorded is not None}
        summary = _write_summary(fcfg, model, table, gathered, meta, out_dir)
    if distributed:
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary


def _tied(model) -> bool:
    """Whether the (peft-unwrapped) model ties its embedding and LM head."""
    from grads.models import is_tied

    return is_tied(model.get_base_model() if hasattr(model, "get_base_model") else model)


@dataclass
class _Pass:
    """What every chunk of one rank's pass uses."""

    fcfg: dict
    model: Any
    tokenizer: Any
    pool: Any
    padding_side: str
    rank: int
    world: int  # 1 without a process group
    chunk: int
    recorded: Any  # Arrow table of the recorded rows, or None
    recorded_ids: Any  # their ids as an Arrow string array, or None


def _run_chunks(p: _Pass, table: _ChunkTable | None) -> dict:
    """Every chunk of the pool in pool order: this rank's share scored, the rows gathered on rank 0
    into ``table``; returns this rank's timings (summed over chunks)."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    tok, r = p.tokenizer, p.rank
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    view, n = _arrow_view(p.pool), len(p.pool)
    n_todo = max(n - (p.recorded.num_rows if p.recorded is not None else 0), 0)
    bar = tqdm(total=n_todo, desc="features", unit="sample",
               disable=not (bool(p.fcfg["progress"]) and r == 0), dynamic_ncols=True)  # fmt: skip
    timings = dict.fromkeys(TIMINGS, 0)
    for start in range(0, n, p.chunk):
        stop = min(start + p.chunk, n)
        ids, lengths = chunk_ids_and_lengths(p.pool, view, start, stop)
        todo, positions = _chunk_todo(ids, start, p.recorded_ids)
        if _resume_chunk(p, table, start, stop, ids, len(todo)):
            bar.update(len(todo))
            continue
        share = todo[r :: p.world]
        local, t = compute_shard(
            p.fcfg, p.model, pad_id, p.padding_side, p.pool, share,
            prefix_id=prefix_id, lengths={i: int(lengths[i - start]) for i in share}, bar=bar,
        )  # fmt: skip
        for k in TIMINGS:
            timings[k] += t[k]
        if p.world > 1:
            parts = [None] * p.world if r == 0 else None
            dist.gather_object(local, parts, dst=0)
        else:
            parts = [local]
        if table is not None:
            table.add(start, stop, parts, todo, positions)
            bar.update(len(todo) - len(share))  # the other ranks' samples of the chunk
    bar.close()
    return timings


def _resume_chunk(
    p: _Pass, table: _ChunkTable | None, start: int, stop: int, ids: Any, n_todo: int
) -> bool:
    """Whether chunk ``[start, stop)`` was saved by an earlier attempt (rank 0 looks, every rank
    follows); rank 0 appends it to ``table``."""
    import torch.distributed as dist

    rows = table.saved(start, stop, ids) if table is not None else None
    found = rows is not None
    if p.world > 1:
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = bool(box[0])
    if table is not None and rows is not None:
        table.add_saved(rows, n_todo)
    return found


def _write_summary(
    fcfg: dict, model, table: _ChunkTable, parts: list[dict], meta: dict, out_dir: str | Path
) -> dict:
    """Rank 0: ``features.json`` (after the table is in place); returns the summary."""
    from grads.io import write_json

    wall = time.perf_counter() - meta["t0"]
    tokens = sum(t["tokens"] for t in parts)
    summary = {
        "source": "warmup" if meta["source"] else "pass",
        "n_samples": table.n_rows,
        "n_recorded": table.n_rows - table.n_computed,
        "n_computed": table.n_computed,
        "n_resumed": table.n_resumed,  # of n_computed: scored by an earlier attempt (saved chunks)
        **table.nan.summary(),
        "columns": table.columns,
        "tied": _tied(model),
        "stats": bool(fcfg["stats"]),
        "ifd": bool(fcfg["ifd"]),
        "batch_size": int(fcfg["batch_size"]),
        "padding_side": meta["padding_side"],
        "device": str(next(model.parameters()).device),  # rank 0's; per_rank has each
        "world_size": len(parts),
        "tokens_processed": tokens,
        "supervised_tokens": sum(t["supervised_tokens"] for t in parts),
        "wall_time_s": wall,
        "feature_time_s": max(t["feature_s"] for t in parts),
        "ifd_time_s": max(t["ifd_s"] for t in parts),
        "tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "samples_per_s": (table.n_computed - table.n_resumed) / wall if wall > 0 else math.nan,
        "per_rank": parts,
    }
    write_json(Path(out_dir) / "features.json", summary)
    return summary


def features_from_warmup(cfg: dict, warmup_dir: str | Path, out_dir: str | Path) -> dict:
    """The features stage for ``features.source: warmup``.

    The warm-up wrote ``features.parquet`` for every sample it trained on, each scored from its own
    training step (the model state of that step, before its update; see
    ``grads.features.gradients.GradNormRecorder``). When that covers the pool, the table is taken as is
    (no model is loaded; copied a chunk at a time). With ``warmup.fraction < 1`` or ``max_steps``
    short of an epoch, the remaining samples are scored by the normal pass on the warm-up's final
    model, on ``features.procs`` processes, and merged chunk by chunk in pool order. With a
    one-epoch warm-up every sample is then scored by a model not yet updated on it: a recorded
    sample just before its own step, any other one by the final model, which never saw it.

    Returns:
        The summary written to ``out_dir/features.json``.
    """
    from grads.io import read_json, write_json

    features_source(cfg)
    warmup_dir, out_dir = Path(warmup_dir), Path(out_dir)
    if not (warmup_dir / "features.json").exists():
        raise FileNotFoundError(
            f"{warmup_dir} has no recorded features.json: the warm-up ran without "
            "features.source=warmup"
        )
    info = read_json(warmup_dir / "features.json")
    if info["n_recorded"] < info["pool_size"]:
        from grads.launch import run_distributed

        procs = int((cfg.get("features") or {}).get("procs") or 1)
        run_distributed(
            "grads.features.compute:_features_rest_job", procs, cfg, str(warmup_dir), str(out_dir)
        )
        return read_json(out_dir / "features.json")
    import pyarrow.parquet as pq

    fcfg = features_settings(cfg)
    columns = feature_columns(bool(info["tied"]), bool(fcfg["stats"]), False)
    t0 = time.perf_counter()
    source = pq.ParquetFile(warmup_dir / "features.parquet")
    with TableWriter(out_dir / "features.parquet", columns) as writer:
        chunk = int(fcfg.get("chunk_size") or CHUNK_SIZE)
        for batch in source.iter_batches(batch_size=chunk, columns=columns):
            writer.write_table(batch)
    summary = {
        **{k: v for k, v in info.items() if k not in ("columns", "stats")},
        "columns": columns,
        "stats": bool(fcfg["stats"]),
        "n_computed": 0,
        "tokens_processed": 0,
        "wall_time_s": time.perf_counter() - t0,
        "recorded_from": str(warmup_dir),
    }
    write_json(out_dir / "features.json", summary)
    return summary


def _features_rest_job(cfg: dict, warmup_dir: str, out_dir: str) -> None:
    """Worker: the pass over the samples the warm-up did not record, merged with its rows (read
    as an Arrow table: the warm-up's fraction of the pool, never as Python rows at once)."""
    import pyarrow.parquet as pq

    from grads.data.pool import load_pool
    from grads.training import load_trained

    model, tokenizer = load_trained(
        cfg["model"], warmup_dir, cache_dir=(cfg.get("paths") or {}).get("model_dir")
    )
    pool = load_pool(cfg, tokenizer, reuse_from=warmup_dir)
    recorded = pq.read_table(Path(warmup_dir) / "features.parquet")
    run_features(cfg, model, tokenizer, pool, out_dir, recorded=recorded)


def run_features_from_config(
    cfg: dict,
    pool: Any,
    out_dir: str | Path,
    model_path: str | None = None,
    recorded: Any = None,
    chunk_size: int | None = None,
) -> dict:
    """Worker entry point (``grads.launch.run_distributed("grads.features.compute:run_features_from_config",
    procs, cfg, pool, out_dir)``): load ``cfg["model"]`` on this rank's device, then ``run_features``
    (``recorded`` and ``chunk_size`` passed on).
    """
    import os

    import torch

    from grads.models import load_model

    threads = (cfg.get("features") or {}).get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    cache_dir = (cfg.get("paths") or {}).get("cache_dir")
    model, tokenizer = load_model(cfg["model"], cache_dir=cache_dir, path=model_path)
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
    return run_features(
        cfg, model, tokenizer, pool, out_dir, recorded=recorded, chunk_size=chunk_size
    )
