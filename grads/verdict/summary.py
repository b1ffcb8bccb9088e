"""The verdict's outputs: ``verdict.json``, the figure, the winner's export and the printed table.

The winning subset is exported by :func:`grads.export.export_selection`, unchanged; the verdict adds
one ``verdict`` key to its ``export.json`` (:func:`add_to_export`, a compact summary) and writes the
full ``verdict.json`` and ``verdict.png`` beside it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from grads.io import read_json, write_json
from grads.verdict.plan import FORGET, LOSS

log = logging.getLogger(__name__)


def compact(report: dict) -> dict:
    """The verdict as ``export.json`` carries it: words, numbers, MDD and where the rest is."""
    keep = ("diff", "lo", "hi")
    return {
        "question": report["question"],
        "against": report["against"],
        "seeds": report["seeds"],
        "heldout": report["heldout"],
        "winner": report["winner"],
        "selectors": [
            {
                "selector": r["selector"],
                "n_selected": r["n_selected"],
                "loss_verdict": r["loss_verdict"],
                "forgetting_verdict": r["forgetting_verdict"],
                LOSS: {k: (r[LOSS] or {}).get(k) for k in keep},
                FORGET: {k: (r[FORGET] or {}).get(k) for k in keep},
                "mdd": r["mdd"],
                "detectable": r["detectable"],
            }
            for r in report["selectors"]
        ],
        "summary": report["summary"],
        "verdict_json": str(Path(report["run_dir"]) / "verdict.json"),
    }


def add_to_export(export_dir: str | Path, report: dict) -> Path:
    """Add the ``verdict`` key to ``<export_dir>/export.json`` (the rest of the export unchanged)."""
    path = Path(export_dir) / "export.json"
    manifest = read_json(path)
    manifest["verdict"] = compact(report)
    return write_json(path, manifest)


def export_winner(report: dict, base: dict, results: list, out_dir: Path) -> Path | None:
    """Export the winner's subset at the first seed (``export.dir``, default ``<run dir>/export``)."""
    from grads.export import export_selection

    win = report["winner"]
    seed = report["seeds"][0]
    match = [
        (job, m)
        for job, m in results
        if job.label == win["selector"]
        and job.seed == seed
        and job.role == win["role"]
        and int(m["n_selected"]) == int(win["n_selected"])
    ]
    if not match:
        log.warning("verdict: no job of the winner %s to export", win["selector"])
        return None
    job, m = match[0]
    dest = Path(str((base.get("export") or {}).get("dir") or out_dir / "export"))
    export_selection(job.cfg, Path(m["artefacts"]["select"]), dest)
    add_to_export(dest, report)
    return dest


def finish(report: dict, base: dict, s, results: list, out_dir: Path) -> dict:
    """Write the figure, the export and ``verdict.json``; print the verdict; return the report."""
    from grads.verdict.figure import plot

    out_dir.mkdir(parents=True, exist_ok=True)
    report["files"] = {
        "verdict": str(out_dir / "verdict.json"),
        "figure": str(plot(report, out_dir / "verdict.png")),
        "export": None,
    }
    if s.export == "winner":
        dest = export_winner(report, base, results, out_dir)
        if dest is not None:
            report["files"]["export"] = str(dest)
    write_json(out_dir / "verdict.json", report)
    if report["files"]["export"]:
        dest = Path(report["files"]["export"])
        shutil.copyfile(out_dir / "verdict.json", dest / "verdict.json")
        shutil.copyfile(out_dir / "verdict.png", dest / "verdict.png")
    print_report(report)
    return report


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]"


def print_report(report: dict) -> None:
    """The leaderboard, the words, the MDD, the cost and where the files are."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{report['question']} ({report['domain']}, {report['budget']})")
    for col in ("selector", "n", "Δ held-out bpb [95 % CI]", "Δ KL [95 % CI]", "verdict"):
        t.add_column(col)
    for r in report["selectors"]:
        words = f"{r['loss_verdict']}; {r['forgetting_verdict']}"
        t.add_row(r["selector"], str(r["n_selected"]), _cell(r[LOSS]), _cell(r[FORGET]), words)
    console.print(t)
    for ref in report["references"]:
        mdd = ref["mdd"]
        console.print(
            f"{ref['selector']} (n={ref['n_selected']}, seeds {ref['seeds']}): MDD "
            f"{_num(mdd.get(LOSS))} bpb, {_num(mdd.get(FORGET))} KL; {ref['detectable_reason']}"
        )
    for line in report["summary"]:
        console.print(f"- {line}")
    console.print(f"winner: {report['winner']['selector']} ({report['winner']['why']})")
    est, got = report["cost"]["estimate"]["seconds"]["total"], report["cost"]["measured"]["wall_s"]
    cache = report["cache"]
    console.print(
        f"cost: estimated {est / 60:.1f} min, measured {got / 60:.1f} min; warm-up and features "
        f"from the cache in {cache['warmup_and_features_from_cache']} of {cache['jobs']} jobs"
    )
    for key, path in report["files"].items():
        if path:
            console.print(f"{key}: {path}")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
