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
the summary (``n_no_supervised_tokens``) and logged as a warning. Under ``torch.distributed`` samples are sharded ``rank::world``
and rank 0 gathers and writes; the table equals a single-process run up to float rounding.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

from grads.constants import IGNORE_INDEX  # noqa: E402
from grads.data.pool import collate  # noqa: E402  (grads.data.pool imports no torch at module level)
from grads.features.store import (  # noqa: E402
    arrow_table,
    check_ifd_answer,
    feature_columns,
    features_source,
    nan_report,
)


def _lengths(pool: Any, indices: list[int]) -> dict[int, int]:
    """``len(input_ids)`` of ``pool[indices]`` without holding every row in memory at once."""
    if isinstance(pool, list | tuple):
        return {i: len(pool[i]["input_ids"]) for i in indices}
    if hasattr(pool, "with_format"):  # datasets.Dataset: read list lengths from Arrow in chunks
        import pyarrow.compute as pc

        arrow, lens, step = pool.with_format("arrow"), [], 8192
        for s in range(0, len(pool), step):
            lens += pc.list_value_length(arrow[s : s + step]["input_ids"]).to_pylist()
        return {i: lens[i] for i in indices}
    return {i: len(pool[int(i)]["input_ids"]) for i in indices}


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


def compute_shard(
    fcfg: dict,
    model,
    pad_id: int,
    padding_side: str,
    pool: Any,
    indices: list[int],
    progress: bool = True,
    prefix_id: int | None = None,
) -> tuple[list[tuple[int, dict]], dict]:
    """Features of ``pool[indices]``, batched by length; returns ``[(pool index, row)]`` and timings."""
    from tqdm.auto import tqdm

    from grads.features.gradients import per_sample_grad_norms, per_sample_loss

    lengths = _lengths(pool, indices)
    # Longest first: padding waste is minimal within a batch and memory trouble shows up at once.
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    bs = int(fcfg["batch_size"])
    out: list[tuple[int, dict]] = []
    t_feat = t_ifd = 0.0
    tokens = sup_tokens = 0
    bar = tqdm(
        total=len(order), desc="features", unit="sample", disable=not progress, dynamic_ncols=True
    )
    t_start = time.perf_counter()
    for s in range(0, len(order), bs):
        idx = order[s : s + bs]
        samples = [pool[int(i)] for i in idx]
        batch = collate(samples, pad_id, padding_side)
        t0 = time.perf_counter()
        res = per_sample_grad_norms(
            model, **batch, stats=bool(fcfg["stats"]), chunk_bytes=int(fcfg["chunk_bytes"])
        )
        t_feat += time.perf_counter() - t0
        cols = {k: v.tolist() for k, v in res.items()}
        if fcfg["ifd"]:
            t0 = time.perf_counter()
            refs = ifd_reference(samples, fcfg["ifd_answer"], prefix_id)
            resp = collate(refs, pad_id, padding_side)
            loss_a, _ = per_sample_loss(model, **resp, chunk_bytes=int(fcfg["chunk_bytes"]))
            t_ifd += time.perf_counter() - t0
            cols["response_loss"] = loss_a.tolist()
            cols["ifd"] = [
                math.exp(lq - la) if math.isfinite(lq - la) else math.nan
                for lq, la in zip(cols["loss"], cols["response_loss"])
            ]
        for b, i in enumerate(idx):
            out.append((i, {"id": str(samples[b]["id"]), **{k: v[b] for k, v in cols.items()}}))
        n_tok = int(batch["attention_mask"].sum())
        tokens += n_tok
        sup_tokens += int(res["n_tokens"].sum())
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t_start, 1e-9):.0f}")
    bar.close()
    timings = {
        "feature_s": t_feat,
        "ifd_s": t_ifd,
        "wall_s": time.perf_counter() - t_start,
        "tokens": tokens,
        "supervised_tokens": sup_tokens,
        "samples": len(order),
    }
    return out, timings


def run_features(
    cfg: dict, model, tokenizer, pool: Any, out_dir: str | Path, recorded: list[dict] | None = None
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
        recorded: rows already scored (the warm-up's, ``features.source=warmup``); only the other
            pool samples are computed, and the table holds both, in pool order.

    Returns:
        The summary written to ``features.json`` (identical on every rank).
    """
    import torch.distributed as dist

    from grads.dist import rank, world_size

    fcfg = features_settings(cfg)
    padding_side = fcfg.get("padding_side") or getattr(tokenizer, "padding_side", None) or "right"
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    r, world = rank(), world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    t0 = time.perf_counter()
    pool_ids = [
        str(x)
        for x in (pool["id"] if hasattr(pool, "column_names") else [row["id"] for row in pool])
    ]
    done = {str(row["id"]): row for row in recorded or []}
    todo = [i for i, sid in enumerate(pool_ids) if sid not in done]

    local, timings = compute_shard(
        fcfg,
        model,
        pad_id,
        padding_side,
        pool,
        todo[r::world] if distributed else todo,
        progress=bool(fcfg["progress"]) and r == 0,
        prefix_id=(
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ),
    )
    timings["device"] = str(next(model.parameters()).device)
    if distributed:
        gathered = [None] * world if r == 0 else None
        dist.gather_object((local, timings), gathered, dst=0)
    else:
        gathered = [(local, timings)]

    summary = None
    if r == 0:
        shard = {"gathered": gathered, "todo": todo, "done": done, "pool_ids": pool_ids}
        n_ranks = world if distributed else 1
        summary = _write_table(fcfg, model, shard, padding_side, t0, out_dir, recorded, n_ranks)
    if distributed:
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary


def _write_table(
    fcfg: dict,
    model,
    shard: dict,
    padding_side: str,
    t0: float,
    out_dir: str | Path,
    recorded: list[dict] | None,
    world_size: int,
) -> dict:
    """Rank 0: merge every rank's rows with the recorded ones (pool order), write the table and
    ``features.json``; return the summary."""
    from grads.io import write_json, write_parquet
    from grads.models import is_tied

    gathered, todo, done, pool_ids = (
        shard["gathered"],
        shard["todo"],
        shard["done"],
        shard["pool_ids"],
    )
    computed = dict(item for part, _ in gathered for item in part)
    assert sorted(computed) == todo, "lost or duplicated samples"
    rows = [computed[i] if i in computed else done[sid] for i, sid in enumerate(pool_ids)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    columns = feature_columns(is_tied(base), bool(fcfg["stats"]), bool(fcfg["ifd"]))
    parts = [t for _, t in gathered]
    wall = time.perf_counter() - t0
    tokens = sum(t["tokens"] for t in parts)
    summary = {
        "source": "warmup" if recorded is not None else "pass",
        "n_samples": len(rows),
        "n_recorded": len(rows) - len(todo),
        "n_computed": len(todo),
        **nan_report(rows),
        "columns": columns,
        "tied": is_tied(base),
        "stats": bool(fcfg["stats"]),
        "ifd": bool(fcfg["ifd"]),
        "batch_size": int(fcfg["batch_size"]),
        "padding_side": padding_side,
        "device": str(next(model.parameters()).device),  # rank 0's; per_rank has each
        "world_size": world_size,
        "tokens_processed": tokens,
        "supervised_tokens": sum(t["supervised_tokens"] for t in parts),
        "wall_time_s": wall,
        "feature_time_s": max(t["feature_s"] for t in parts),
        "ifd_time_s": max(t["ifd_s"] for t in parts),
        "tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "samples_per_s": len(todo) / wall if wall > 0 else math.nan,
        "per_rank": parts,
    }
    out_dir = Path(out_dir)
    write_parquet(out_dir / "features.parquet", arrow_table(rows, columns))
    write_json(out_dir / "features.json", summary)
    return summary


def features_from_warmup(cfg: dict, warmup_dir: str | Path, out_dir: str | Path) -> dict:
    """The features stage for ``features.source: warmup``.

    The warm-up wrote ``features.parquet`` for every sample it trained on, each scored from its own
    training step (the model state of that step, before its update; see
    ``grads.features.gradients.GradNormRecorder``). When that covers the pool, the table is taken as is
    (no model is loaded). With ``warmup.fraction < 1`` or ``max_steps`` short of an epoch, the
    remaining samples are scored by the normal pass on the warm-up's final model, on
    ``features.procs`` processes, and merged. With a one-epoch warm-up every sample is then scored
    by a model not yet updated on it: a recorded sample just before its own step, any other one
    by the final model, which never saw it.

    Returns:
        The summary written to ``out_dir/features.json``.
    """
    from grads.io import read_json, write_json, write_parquet

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
    table = pq.read_table(warmup_dir / "features.parquet").select(columns)
    write_parquet(out_dir / "features.parquet", table)
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
    """Worker: the pass over the samples the warm-up did not record, merged with its rows."""
    import pyarrow.parquet as pq

    from grads.data.pool import load_pool
    from grads.training import load_trained

    model, tokenizer = load_trained(
        cfg["model"], warmup_dir, cache_dir=(cfg.get("paths") or {}).get("model_dir")
    )
    pool = load_pool(cfg, tokenizer)
    recorded = pq.read_table(Path(warmup_dir) / "features.parquet").to_pylist()
    run_features(cfg, model, tokenizer, pool, out_dir, recorded=recorded)


def run_features_from_config(
    cfg: dict, pool: Any, out_dir: str | Path, model_path: str | None = None
) -> dict:
    """Worker entry point (``grads.launch.run_distributed("grads.features.compute:run_features_from_config",
    procs, cfg, pool, out_dir)``): load ``cfg["model"]`` on this rank's device, then ``run_features``.
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
    return run_features(cfg, model, tokenizer, pool, out_dir)
