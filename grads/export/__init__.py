"""Export a selection: the subset as data other trainers read, and what it is made of.

Written to ``export.dir`` (default ``<run dir>/export``) after the select stage::

    selected.jsonl    one record per line, best first (always)
    selected/         the same rows as a Hugging Face datasets folder (``export.format``: datasets)
    trl.jsonl, trl/   TRL prompt-completion records (``export.format``: trl; see .formats)
    messages.jsonl, messages/   TRL conversational records (``export.format``: messages)
    scores.parquet    every pool sample: features, score, rank, selected (see .scores)
    selection.png     the pool in the gradient-norm plane, subset marked, beside the score histogram
    composition.png   the subset against the pool by source/template, answer, length, duplicates
    export.json       manifest: rows, files, pool, selector, budget, composition and warnings
                      (written last)

Rows of a ``domain=custom`` pool keep every original field and gain ``id`` (the sample's content
hash, as in ``selection.jsonl``), ``score`` (the selector's score) and ``rank`` (0 = best). An
original field already called ``id``, ``score`` or ``rank`` is kept as ``original_<name>``. Rows of
a built-in domain hold ``id``, ``score``, ``rank``, ``source``, ``prompt``, ``response``, ``system``
and ``messages`` (the chat turns the model was trained on).

``export.json``'s ``composition`` (:mod:`grads.export.composition`) compares the subset with the
pool; ``warnings`` lists every axis on which the subset is far more concentrated than the pool
(also logged). ``export.enabled=auto`` exports for ``domain=custom`` and for ``grads-select``;
``true`` / ``false`` force it. Each file is replaced atomically, so a killed export never leaves a
half-written one.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grads.export.formats import parse_formats, save_dataset
from grads.io import atomic_path, read_json, read_jsonl, release_memory, write_json, write_jsonl

log = logging.getLogger(__name__)

ADDED = ("id", "score", "rank")


def is_custom(cfg: dict) -> bool:
    """Whether the domain's pool comes from :mod:`grads.data.custom_pool` (sources with a builder)."""
    return any((s or {}).get("builder") for s in cfg["domain"].get("sources") or [])


def maybe_export(cfg: dict, select_dir: str | Path, run_dir: str | Path) -> dict:
    """Export when ``cfg.export.enabled`` says so; returns ``{"export": manifest}`` or ``{}``."""
    opts = cfg.get("export") or {}
    enabled = opts.get("enabled", "auto")
    if enabled not in ("auto", True, False):
        raise ValueError(f"export.enabled={enabled!r}: expected auto, true or false")
    if enabled is False or (enabled == "auto" and not is_custom(cfg)):
        return {}
    out = Path(str(opts.get("dir") or Path(run_dir) / "export"))
    return {"export": export_selection(cfg, select_dir, out)}


def export_selection(cfg: dict, select_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the selected records of ``select_dir`` to ``out_dir`` (see the module docstring).

    Args:
        cfg: the resolved run config (domain, data, selector, budget, seed, export).
        select_dir: a completed select-stage folder (``selection.jsonl``, ``selection.json``).
        out_dir: where to write; created if missing. Only the export's own files are replaced.

    Returns:
        The manifest written to ``export.json``.

    Raises:
        ValueError: a bad ``export.format``.
        RuntimeError: selected ids not found in the pool (the pool changed after selection).
    """
    select_dir, out_dir = Path(select_dir), Path(out_dir)
    formats = parse_formats((cfg.get("export") or {}).get("format"))
    picks = sorted(read_jsonl(select_dir / "selection.jsonl"), key=lambda p: p["rank"])
    records, rows, pool_info, sampled = _pool(cfg, [p["id"] for p in picks], select_dir)
    out = [_with_selection(rows[p["id"]], p) for p in picks]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "selected.jsonl", out)
    files: dict[str, Any] = {"jsonl": str(out_dir / "selected.jsonl"), "dataset": None}
    columns = list(dict.fromkeys(k for r in out for k in r))
    if "datasets" in formats:
        columns = save_dataset(out, out_dir / "selected")
        files["dataset"] = str(out_dir / "selected")
    from grads.export.formats import write_trainer_formats

    files |= write_trainer_formats(formats, [records[p["id"]] for p in picks], out_dir)
    n_rows = len(out)
    del out, rows
    sel = read_json(select_dir / "selection.json")
    comp, labels = _composition(cfg, sel, picks, records, select_dir, sampled)
    del records  # the ranking below reads the features table, not the pool
    release_memory()
    report = _report(cfg, sel, picks, comp, labels, select_dir, out_dir)
    manifest = _manifest(cfg, sel, n_rows, columns, formats, files, report, select_dir, pool_info)
    write_json(out_dir / "export.json", manifest)
    log.info("export: %d of %s records -> %s", n_rows, sel.get("pool_size"), out_dir)
    return manifest


def _manifest(
    cfg: Mapping,
    sel: Mapping,
    n_rows: int,
    columns: list,
    formats: Sequence[str],
    files: dict,
    report: dict,
    select_dir: Path,
    pool_info: dict,
) -> dict:
    """The ``export.json`` manifest (``jsonl``/``dataset``/``plot`` stay top-level keys)."""
    from grads.selectors.balance import method_name

    return {
        "rows": n_rows,
        "pool_size": sel.get("pool_size"),
        "fields": columns,
        "formats": list(formats),
        "jsonl": files.pop("jsonl"),
        "dataset": files.pop("dataset"),
        **files,  # trl / messages: {"jsonl", "dataset"}
        "scores": report["scores"],
        "plot": report["plot"],
        "composition_plot": report["composition_plot"],
        "selector": method_name(cfg),
        "budget": cfg["budget"].get("name"),
        "seed": cfg.get("seed"),
        "select_dir": str(select_dir),
        "pool": pool_info,
        "composition": report["composition"],
        "warnings": report["composition"]["warnings"],
    }


POOL_SAMPLE = 50_000  # pool records the composition reads beyond the subset (a uniform sample)


def _pool(
    cfg: dict, ids: list[str], select_dir: Path
) -> tuple[dict[str, Any], dict[str, dict], dict, list[str] | None]:
    """The records of the selected ids and of a uniform sample of the pool, the export rows of the
    selected ids, a pool description and the sample's ids (``None``: the sample is the whole pool).

    Records come from :func:`grads.data.pool.iter_pool_records`, the stream the warm-up and features
    stage read the pool from (same templates, system prompt, de-duplication), read once; a pool of
    at most :data:`POOL_SAMPLE` samples is kept whole, a larger one as a seeded reservoir sample
    of that size (Vitter's algorithm R), so memory does not grow with the pool. Rows of a custom
    pool are its original rows; a built-in domain's are the rendered fields.
    """
    from collections import Counter

    from grads.data.pool import iter_pool_records, materialise_generated, messages_of

    if cfg["domain"].get("generator"):
        materialise_generated(cfg["domain"], cfg)
    wanted = set(ids)
    records: dict[str, Any] = {}  # the selected ids' records
    sample: list[Any] = []  # a uniform sample of the pool, in pool order once sorted
    rng = np.random.default_rng([int(cfg.get("seed") or 0), 17])
    seen = 0
    for pos, r in enumerate(iter_pool_records(cfg["domain"], cfg.get("data"), Counter())):
        if r.id in wanted:
            records.setdefault(r.id, r)
        seen += 1
        if len(sample) < POOL_SAMPLE:
            sample.append((pos, r))
        elif (j := int(rng.integers(seen))) < POOL_SAMPLE:
            sample[j] = (pos, r)
    sample.sort(key=lambda item: item[0])
    sampled = [r.id for _, r in sample] if seen > POOL_SAMPLE else None
    for _, r in sample:
        records.setdefault(r.id, r)
    if is_custom(cfg):
        from grads.data.custom_pool import describe, selected_rows, to_jsonable

        source = next(s for s in cfg["domain"]["sources"] if s.get("builder"))
        system = (cfg.get("data") or {}).get("system_prompt")
        rows = {i: to_jsonable(r) for i, r in selected_rows(source, ids, system).items()}
        info = describe(source)
    else:
        keys = ("source", "prompt", "response", "system")
        rows = {
            i: {k: getattr(records[i], k) for k in keys} | {"messages": messages_of(records[i])}
            for i in ids
            if i in records
        }
        info = {"domain": cfg["domain"].get("name")}
    missing = [i for i in ids if i not in rows or i not in records]
    if missing:
        raise RuntimeError(
            f"export: {len(missing)} selected ids are not in the pool any more (first: "
            f"{missing[:3]}); the pool changed after {select_dir} was made: re-run selection"
        )
    return records, rows, info, sampled


def _composition(
    cfg: Mapping,
    sel: Mapping,
    picks: list[dict],
    records: Mapping[str, Any],
    select_dir: Path,
    sampled: list[str] | None = None,
) -> tuple[dict, dict[str, dict[str, str]]]:
    """The composition summary and its group labels (``{axis: {id: label}}``); with ``sampled``
    (the ids of a sample of a large pool) the composition compares the subset with that sample."""
    from grads.export import scores
    from grads.export.composition import composition, group_labels
    from grads.selectors.balance import SKEW_WARNING

    seed = int(sel.get("seed", cfg.get("seed")) or 0)
    path = scores.features_path(sel)
    if path is not None:
        pool_ids, n_tokens = scores.pool_view(path, records, sampled)
    else:
        log.warning(
            "export: %s names no features table that still exists; scores.parquet and the "
            "gradient-norm plane are left out",
            select_dir,
        )
        pool_ids, n_tokens = (list(records) if sampled is None else sampled), None
    opts = cfg.get("export") or {}
    threshold = float(opts.get("concentration_warning") or SKEW_WARNING)
    chosen = [p["id"] for p in picks]
    labels = group_labels(records, pool_ids, extra=chosen)
    comp = composition(records, pool_ids, chosen, n_tokens, threshold, seed, labels=labels)
    comp["settings"]["pool_sample"] = POOL_SAMPLE
    comp["settings"]["pool_sampled"] = sampled is not None
    return comp, labels


def _report(
    cfg: Mapping,
    sel: Mapping,
    picks: list[dict],
    comp: dict,
    labels: Mapping[str, Mapping[str, str]],
    select_dir: Path,
    out_dir: Path,
) -> dict:
    """``scores.parquet`` (streamed from the features table) and the two figures."""
    from grads.export import scores
    from grads.export.figures import composition_figure, selection_figure

    seed = int(sel.get("seed", cfg.get("seed")) or 0)
    path = scores.features_path(sel)
    out = {"composition": comp, "scores": None, "plot": None, "composition_plot": None}
    if path is not None:
        ranked = scores.rank_pool(cfg, path, seed)
        pool = scores.pool_scores(path, picks, ranked)
        art = scores.plot_artifacts(ranked)
        del ranked  # a Selection of the whole pool, ids included
        release_memory()
        out["scores"] = str(scores.write_scores(path, pool, labels, out_dir / "scores.parquet"))
        title = _title(cfg, sel, len(picks))
        out["plot"] = str(selection_figure(path, pool, art, title, out_dir / "selection.png"))
    elif (select_dir / "selection.png").exists():  # no features table: the select stage's plot
        with atomic_path(out_dir / "selection.png") as tmp:
            shutil.copyfile(select_dir / "selection.png", tmp)
        out["plot"] = str(out_dir / "selection.png")
    plot = composition_figure(comp, out_dir / "composition.png")
    out["composition_plot"] = str(plot) if plot else None
    return out


def _title(cfg: Mapping, sel: Mapping, k: int) -> str:
    from grads.selectors.balance import method_name

    return (
        f"{method_name(cfg)}, budget {cfg['budget'].get('name')}: {k:,} of {sel.get('pool_size')}"
    )


def _with_selection(row: dict, pick: dict) -> dict:
    """The row with ``id``/``score``/``rank`` added; clashing original fields become ``original_*``."""
    out = {}
    for key, value in row.items():
        out[f"original_{key}" if key in ADDED else key] = value
    score = pick.get("score")
    if isinstance(score, float) and not math.isfinite(score):
        score = None  # JSON has no NaN; a selector that does not score leaves it empty
    return out | {"id": pick["id"], "score": score, "rank": int(pick["rank"])}
