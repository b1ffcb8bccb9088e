"""Re-run one cell of the committed real-domain tables and check it lands inside its reported CI.

The cell (domain, method, budget, seed) is trained and evaluated again in a scratch cache, and its
per-item results are paired with the committed reference run (``random``, same budget and seed) exactly
as the tables pair them. The cell reproduces when the re-run's paired difference lies inside the
committed 95 % CI for every paired metric (:data:`grads.report.paired.PAIRED_METRICS`).

By default the scratch cache is seeded with the cell's warm-up and features entries (hard links) from
``--cache-from``, so the check re-runs selection, fine-tuning and evaluation (including the base
model's scores) in minutes; ``--from-scratch`` recomputes the warm-up and features too.

    python scripts/reproduce_cell.py financial grads_paper --cache-from outputs/cache
    python scripts/reproduce_cell.py financial grads.density.embed --from-scratch
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grads.constants import REPO_ROOT
from grads.io import read_json
from grads.paper.protocol import domains, is_ablation
from grads.report.collect import read_csvs
from grads.report.paired import PAIRED_METRICS

UPSTREAM = ("warmup", "features")  # stages a seeded scratch cache reuses


def cell_overrides(domain: str, method: str, budget: str, seed: int) -> list[str]:
    """The ``grads`` overrides that ran the cell (Table 1 selectors and Table 2 ``grads.<rule>.<src>``)."""
    common = [f"domain={domain}", f"budget={budget}", f"seed={seed}"]
    if is_ablation(method):
        _, rule, source = method.split(".")
        layers = "[" + ",".join(source.split("+")) + "]"
        return ["experiment=paper_ablation", "selector=grads", f"selector.rule={rule}",
                f"selector.layers={layers}", *common]  # fmt: skip
    if not (Path(REPO_ROOT) / "conf" / "selector" / f"{method}.yaml").is_file():
        raise SystemExit(
            f"{method!r} is neither a selector (conf/selector/) nor a Table 2 name grads.<rule>.<source>"
        )
    return ["experiment=paper_main", f"selector={method}", *common]


def stage_keys(overrides: list[str]) -> dict[str, str]:
    """The cell's cache key per stage, computed as the pipeline computes them."""
    from grads.config import compose_resolved
    from grads.pipeline import job_identities

    return {s: i.key for s, i in job_identities(compose_resolved(overrides)).items()}


def seed_cache(src: Path, dst: Path, keys: dict[str, str]) -> list[str]:
    """Hard-link (or copy) the upstream entries of the cell from ``src`` into ``dst``."""
    linked = []
    for stage in UPSTREAM:
        entry = src / stage / keys[stage]
        if not entry.is_dir():
            raise SystemExit(
                f"{entry}: no {stage} entry for this cell in --cache-from (use --from-scratch)"
            )

        def link(a: str, b: str) -> None:
            try:
                os.link(a, b)
            except OSError:  # another file system
                shutil.copy2(a, b)

        shutil.copytree(entry, dst / stage / keys[stage], copy_function=link)
        linked.append(f"{stage}/{keys[stage]}")
    return linked


def committed(csv: Path, method: str, budget: str, seed: int, reference: str):
    """``(row items, reference items)`` of the committed cell, per-item results included."""
    df, items = read_csvs([csv])
    if not items:
        raise SystemExit(f"{csv}: no per-item results beside it (<stem>_items.json.gz)")
    by_job = {str(r["job"]): r["items"] for r in items}

    def find(sel: str) -> dict:
        rows = df[(df["selector"] == sel) & (df["budget"] == budget) & (df["seed"] == seed)]
        if rows.empty:
            raise SystemExit(f"{csv}: no committed run of {sel} at {budget}, seed {seed}")
        return by_job[str(rows.iloc[0]["job"])]

    return find(method), find(reference)


def compare(new_items: dict, old_items: dict, ref_items: dict) -> list[dict]:
    """Per paired metric: the committed difference and CI vs the reference, and the re-run's."""
    from grads.evaluation.metrics import ITEM_METRICS
    from grads.evaluation.stats import paired_bootstrap

    out = []
    for name in PAIRED_METRICS:
        part = ITEM_METRICS[name].part
        a_old, a_new, b = (x.get("tuned", {}).get(part) for x in (old_items, new_items, ref_items))
        if not (a_old and a_new and b):
            continue
        old, new = paired_bootstrap([a_old], [b], name), paired_bootstrap([a_new], [b], name)
        if old is None or new is None:
            continue
        inside = old.lo <= new.mean <= old.hi
        out.append({"metric": name, "committed": old, "rerun": new.mean, "inside": inside})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("domain", choices=domains())
    ap.add_argument("method", help="a Table 1 selector or a Table 2 name grads.<rule>.<source>")
    ap.add_argument("--budget", default="p5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", default="random")
    ap.add_argument("--csv", default=None, help="default: results/tables/<domain>/<domain>.csv")
    ap.add_argument("--cache-from", default=str(REPO_ROOT / "outputs" / "cache"))
    ap.add_argument("--from-scratch", action="store_true", help="recompute warm-up and features")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    csv = Path(args.csv or REPO_ROOT / "results" / "tables" / args.domain / f"{args.domain}.csv")
    overrides = cell_overrides(args.domain, args.method, args.budget, args.seed)
    # check everything that can fail before any training starts
    old_items, ref_items = committed(csv, args.method, args.budget, args.seed, args.reference)
    keys = stage_keys(overrides)
    scratch = Path(tempfile.mkdtemp(prefix="grads_repro_"))
    try:
        if not args.from_scratch:
            for e in seed_cache(Path(args.cache_from), scratch / "cache", keys):
                print(f"reused from {args.cache_from}: {e}")
        cmd = [sys.executable, "-m", "grads.cli.main", *overrides,
               f"paths.cache_dir={scratch / 'cache'}", f"hydra.run.dir={scratch / 'run'}"]  # fmt: skip
        print("re-running:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        metrics = read_json(scratch / "run" / "metrics.json")
        new_items = metrics.get("items") or {}
        rows = compare(new_items, old_items, ref_items)
        shared = selection_overlap(metrics, csv.parent / "selections", args)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if not rows:
        raise SystemExit("no paired metric in common between the re-run and the committed runs")
    print(f"\n{args.domain} {args.method} {args.budget} seed {args.seed} vs {args.reference}:")
    for r in rows:
        c = r["committed"]
        verdict = "inside" if r["inside"] else "OUTSIDE"
        print(f"  {r['metric']:<12} committed {c.mean:+.4f} [{c.lo:+.4f}, {c.hi:+.4f}]"
              f"  re-run {r['rerun']:+.4f}  {verdict}")  # fmt: skip
    if shared is not None:
        n, k = shared
        print(
            f"  selection   {n} of the committed subset's {k} samples selected again "
            f"({'same warm-up and features' if not args.from_scratch else 'warm-up recomputed'})"
        )
    return 0 if all(r["inside"] for r in rows) else 1


def selection_overlap(metrics: dict, sel_dir: Path, args) -> tuple[int, int] | None:
    """``(shared, k)``: how many of the committed subset's ``k`` ids the re-run selected again
    (``None`` when either selection is missing). With ``--from-scratch`` the warm-up runs again, and
    its floating-point path (another machine, another thread count) can move the ranking."""
    from grads.io import read_jsonl

    committed_file = sel_dir / f"{args.method}_{args.budget}_seed{args.seed}.jsonl"
    new_file = Path(metrics.get("artefacts", {}).get("select", "")) / "selection.jsonl"
    if not committed_file.is_file() or not new_file.is_file():
        return None
    old = {r["id"] for r in read_jsonl(committed_file)}
    new = {r["id"] for r in read_jsonl(new_file)}
    return len(old & new), len(old)
