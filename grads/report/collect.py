"""Collect a sweep's ``metrics.json`` files into rows, and read collected CSVs back.

Re-runnable and tolerant: jobs without a ``metrics.json`` (crashed, killed, still running) are listed,
never fatal. The collected long-form CSV is the source of truth; the per-item results that the paired
tables need are written next to it (``<title>_items.json.gz``), so every table and plot can be rebuilt
from the CSV alone.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from grads.evaluation.metrics import headline_keys
from grads.io import read_json

ID_COLS = ["domain", "selector", "budget", "model", "trainer_mode", "seed"]
METRIC_COLS = [
    "domain_acc",
    "general_acc",
    "domain_gain",
    "forgetting",
    "n_selected",
    "n_pool",
    "selection_cost_s",
    "finetune_s",
    "finetune_tokens",
    "wall_s",
]
EXTRA_COLS = [k for k in headline_keys() if k not in METRIC_COLS]
STAGES = ("warmup", "features", "select", "finetune", "evaluate")


def collect(sweep_dir: str | Path, keep_items: bool = False) -> tuple[list[dict], list[str]]:
    """All ``metrics.json`` rows under ``sweep_dir`` plus the job folders that have none.

    With ``keep_items`` every row also holds the run's per-item results under ``items``.
    """
    sweep_dir = Path(sweep_dir)
    rows, missing = [], []
    for cfg in sorted(sweep_dir.rglob("config_resolved.yaml")):
        job = cfg.parent
        mfile = job / "metrics.json"
        if not mfile.exists():
            missing.append(str(job))
            continue
        try:
            m = json.loads(mfile.read_text())
        except json.JSONDecodeError:
            missing.append(f"{job} (unreadable metrics.json)")
            continue
        row = {k: m.get(k) for k in ID_COLS + METRIC_COLS + EXTRA_COLS}
        cost = m.get("cost", {})
        row["finetune_s"] = cost.get("finetune", {}).get("wall_s")
        row["select_s"] = cost.get("select", {}).get("wall_s")
        row["finetune_tokens"] = cost.get("finetune", {}).get("tokens")
        row |= _stage_costs(m)
        for task, res in (m.get("tasks") or {}).items():
            if isinstance(res, dict) and "acc" in res:
                row[f"task/{task}"] = res["acc"]
                if res.get("acc_norm") is not None:  # answer-text tasks (HellaSwag, ARC, ...)
                    row[f"task/{task}/acc_norm"] = res["acc_norm"]
        row["job"] = str(job.relative_to(sweep_dir))
        if keep_items:
            row["items"] = m.get("items") or {}
        rows.append(row)
    return rows, missing


def _stage_costs(m: dict) -> dict:
    """Wall seconds of every stage as first computed, whether this job computed it, and the split
    of the features stage into the gradient-norm pass and the IFD pass (the rest of that stage is
    the baselines' representation passes), read from the cached stage's ``stage.json``."""
    cost, out = m.get("cost") or {}, {}
    for stage in STAGES:
        if stage in cost:
            out[f"{stage}_s"] = cost[stage].get("wall_s")
            out[f"{stage}_cached"] = bool(cost[stage].get("cached"))
    info = Path((m.get("artefacts") or {}).get("features", "")) / "stage.json"
    if info.is_file():
        st = read_json(info)
        out["features_gradnorm_s"] = st.get("feature_time_s")
        out["features_ifd_s"] = st.get("ifd_time_s")
    return out


def write_items(path: Path, items: list[dict]) -> Path:
    """The runs' per-item results (``[{"job", "items"}]``) as gzipped JSON, written atomically and
    byte-identically for the same runs (no timestamp in the gzip header)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    blob = json.dumps(items).encode("utf-8")
    with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(blob)  # mtime=0: the same runs give a byte-identical file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    os.replace(tmp, path)
    return path


def read_items(path: Path) -> list[dict] | None:
    """What :func:`write_items` wrote, or ``None`` when there is no such file."""
    if not path.exists():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def read_csvs(paths: list[Path]):
    """Collected CSVs (and their ``<stem>_items.json.gz``) as one frame and one item list.

    One CSV is read as is. Several (e.g. one per domain) are concatenated; their job names are
    prefixed with the CSV's stem so that runs of different sweeps never share a key. A CSV without
    the collector's ``job`` and ``selector`` columns (``results/tables/*/*.csv`` also matches each
    domain's ``pool_features.csv``) is skipped with a note on stderr.

    Raises:
        ValueError: when no CSV is a collected sweep.
    """
    import pandas as pd

    frames, items, any_items = [], [], False
    runs = []
    for path in map(Path, paths):
        df = pd.read_csv(path)
        if not {"job", "selector"} <= set(df.columns):
            print(
                f"skipped {path}: not a collected sweep (no job/selector columns)", file=sys.stderr
            )
            continue
        runs.append((path, df))
    if not runs:
        raise ValueError(f"none of {[str(p) for p in paths]} is a collected sweep CSV")
    for path, df in runs:
        its = read_items(path.with_name(f"{path.stem}_items.json.gz"))
        if len(runs) > 1:
            df["job"] = [f"{path.stem}/{j}" for j in df["job"]]
            its = [{**it, "job": f"{path.stem}/{it['job']}"} for it in its or []]
        any_items |= its is not None
        frames.append(df)
        items += its or []
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return df, (items if any_items else None)


def with_items(records: list[dict], items: list[dict] | None) -> list[dict]:
    """``records`` (collected rows) each with its run's per-item results under ``items``, matched
    by job (a CSV may read job ``"0"`` back as ``0``); ``None`` where a run has none."""
    by_job = {str(r["job"]): r["items"] for r in items or []}
    return [{**r, "items": by_job.get(str(r.get("job")))} for r in records]
