"""Export a selection as data another trainer reads: JSON Lines, a ``datasets`` folder and the plot.

Written to ``export.dir`` (default ``<run dir>/export``) after the select stage::

    selected.jsonl   one record per line, best first
    selected/        the same rows as a Hugging Face datasets folder (``Dataset.save_to_disk``)
    selection.png    the selection plot, when the selector draws one
    export.json      manifest: rows, fields, pool, selector, budget, select-stage key (written last)

Rows of a ``domain=custom`` pool keep every original field and gain ``id`` (the sample's content
hash, as in ``selection.jsonl``), ``score`` (the selector's score) and ``rank`` (0 = best). An
original field already called ``id``, ``score`` or ``rank`` is kept as ``original_<name>``. Rows of
a built-in domain hold ``id``, ``score``, ``rank``, ``source``, ``prompt``, ``response``, ``system``
and ``messages`` (the chat turns the model was trained on).

``export.enabled=auto`` exports for ``domain=custom`` and for ``grads-select``; ``true`` / ``false``
force it. Each file is replaced atomically, so a killed export never leaves a half-written one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from grads.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

ADDED = ("id", "score", "rank")


def is_custom(cfg: dict) -> bool:
    """Whether the domain's pool comes from :mod:`grads.custom_pool` (sources with a builder)."""
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
        cfg: the resolved run config (domain, data.system_prompt, selector, budget).
        select_dir: a completed select-stage folder (``selection.jsonl``, ``selection.png``).
        out_dir: where to write; created if missing. Only the export's own files are replaced.

    Returns:
        The manifest written to ``export.json``.

    Raises:
        RuntimeError: selected ids not found in the pool (the pool changed after selection).
    """
    select_dir, out_dir = Path(select_dir), Path(out_dir)
    picks = read_jsonl(select_dir / "selection.jsonl")
    ids = [p["id"] for p in picks]
    rows, pool_info = _pool_rows(cfg, ids)
    missing = [i for i in ids if i not in rows]
    if missing:
        raise RuntimeError(
            f"export: {len(missing)} selected ids are not in the pool any more (first: "
            f"{missing[:3]}); the pool changed after {select_dir} was made: re-run selection"
        )
    out = [_with_selection(rows[p["id"]], p) for p in sorted(picks, key=lambda p: p["rank"])]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "selected.jsonl", out)
    columns = save_dataset(out, out_dir / "selected")
    plot = select_dir / "selection.png"
    if plot.exists():
        with atomic_path(out_dir / "selection.png") as tmp:
            shutil.copyfile(plot, tmp)
    from grads.selectors.balance import method_name

    sel = read_json(select_dir / "selection.json")
    manifest = {
        "rows": len(out),
        "pool_size": sel.get("pool_size"),
        "fields": columns,
        "jsonl": str(out_dir / "selected.jsonl"),
        "dataset": str(out_dir / "selected"),
        "plot": str(out_dir / "selection.png") if plot.exists() else None,
        "selector": method_name(cfg),
        "budget": cfg["budget"].get("name"),
        "seed": cfg.get("seed"),
        "select_dir": str(select_dir),
        "pool": pool_info,
    }
    write_json(out_dir / "export.json", manifest)
    log.info("export: %d of %s records -> %s", len(out), sel.get("pool_size"), out_dir)
    return manifest


def _pool_rows(cfg: dict, ids: list[str]) -> tuple[dict[str, dict], dict]:
    """``{id: row}`` for the selected ids, and a description of the pool they come from."""
    system = (cfg.get("data") or {}).get("system_prompt")
    if is_custom(cfg):
        from grads.custom_pool import describe, selected_rows, to_jsonable

        source = next(s for s in cfg["domain"]["sources"] if s.get("builder"))
        found = selected_rows(source, ids, system)
        return {i: to_jsonable(r) for i, r in found.items()}, describe(source)
    from grads.data import load_records, materialise_generated, messages_of

    if cfg["domain"].get("generator"):
        materialise_generated(cfg["domain"], cfg)
    records, _ = load_records(cfg["domain"], cfg.get("data"))
    want = set(ids)
    rows = {
        r.id: {
            "source": r.source,
            "prompt": r.prompt,
            "response": r.response,
            "system": r.system,
            "messages": messages_of(r),
        }
        for r in records
        if r.id in want
    }
    return rows, {"domain": cfg["domain"].get("name")}


def _with_selection(row: dict, pick: dict) -> dict:
    """The row with ``id``/``score``/``rank`` added; clashing original fields become ``original_*``."""
    out = {}
    for key, value in row.items():
        out[f"original_{key}" if key in ADDED else key] = value
    score = pick.get("score")
    if isinstance(score, float) and not math.isfinite(score):
        score = None  # JSON has no NaN; a selector that does not score leaves it empty
    return out | {"id": pick["id"], "score": score, "rank": int(pick["rank"])}


def save_dataset(rows: list[dict], path: str | Path) -> list[str]:
    """``Dataset.save_to_disk`` of ``rows`` (atomically); returns the column names.

    Columns are the union of the rows' keys (a key missing from a row is null there). A column whose
    values Arrow cannot hold in one type (e.g. numbers in some rows, text in others) is stored as
    JSON text, with a warning naming it.
    """
    import pyarrow as pa
    from datasets import Dataset

    columns = list(dict.fromkeys(k for r in rows for k in r))
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            log.warning("export: column %r has mixed types; stored as JSON text in %s", col, path)
            arrays[col] = pa.array(
                [v if isinstance(v, str) or v is None else json.dumps(v) for v in values]
            )
    table = pa.table(arrays) if arrays else pa.table({"id": pa.array([], pa.string())})
    with atomic_path(path) as tmp:
        Dataset(table).save_to_disk(str(tmp))
    return columns
