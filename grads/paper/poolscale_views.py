"""What the pool-scale experiment (:mod:`grads.paper.poolscale`) writes besides the usual tables.

* :func:`curve_figure`: held-out bpb and KL against the budget (log scale) for ``random`` and
  ``grads`` (``grads_paper`` at 5 %), ``full`` and the base model as reference lines; the bottom row
  is each method's paired difference with ``random`` and its 95 % CI.
* :func:`pool_size_report` (``pool_size.md``): the same 5 % comparisons (method − random, paired,
  :func:`pool_size_table`; absolute means, :func:`absolute_table`) on the committed 1,000-sample
  pool (float32), the 1,000-sample pool under bf16 autocast (the bridge) and the whole pool, side
  by side, from the collected CSVs alone: what changes with the pool size, and what does not.
* :func:`stability_report`: how many of a 5 % subset's samples a second warm-up seed selects again.
"""

from __future__ import annotations

from pathlib import Path

from grads.io import read_json, read_jsonl, write_json, write_text

DOMAIN = "financial"  # the pool-scale experiment's domain (grads.paper.poolscale)
METRICS = ("domain_bpb", "general_kl")
LABELS = {"domain_bpb": "held-out bpb", "general_kl": "KL(base ‖ tuned)"}
# the stages no other job of a sweep shares (the warm-up, features and selections are shared)
JOB_STAGES = ("finetune", "evaluate")
BUDGET_TICKS = (0.01, 0.05, 0.1, 0.25)  # the curve's budgets; full and base are lines


def collect_runs(sweep_dirs: list[Path], out_dir: Path, title: str) -> None:
    """The usual tables of the runs under ``sweep_dirs`` (:func:`grads.paper.tables.main`), their
    selected ids, the pool's features and the subset views (:func:`grads.paper.views.selection_views`),
    then the curve figure."""
    from grads.paper.publish import publish_pool_features, publish_selections
    from grads.paper.tables import main as report_main
    from grads.paper.views import selection_views

    dirs = [d for d in sweep_dirs if any(d.rglob("metrics.json"))]
    if not dirs:
        return
    report_main([*map(str, dirs), "--out", str(out_dir), "--title", title])
    sources: dict[str, str] = {}
    for d in dirs:
        sources |= publish_selections(d, out_dir / "selections")
    # the features of this collection's own pool (the bridge's 1,000 samples, not main_p5's)
    for d in dirs if sources else []:
        if publish_pool_features(d.parent, out_dir / "pool_features.csv", sources, d.name):
            break
    if sources:  # what the subsets are made of: sources, overlap, profile, map
        selection_views(DOMAIN, out_dir, sources)
    rows = load_rows(out_dir / f"{title}.csv")
    if rows:
        curve_figure(rows, out_dir / f"curve_{title}.png")


def load_rows(csv: Path) -> list[dict]:
    """The collected rows of ``csv`` with their per-item results (``items``), as the paired tables
    read them; ``[]`` when the CSV does not exist."""
    if not csv.is_file():
        return []
    from grads.report.collect import read_csvs, with_items

    df, items = read_csvs([csv])
    return with_items(df.to_dict("records"), items)


def paired_vs_random(rows: list[dict]) -> dict[tuple[str, str, str], object]:
    """``(budget, method, metric) -> Paired`` (method − random, same budget, seeds and items)."""
    from grads.report.paired import paired_tables

    raw: dict = {}
    paired_tables(rows, metrics=list(METRICS), raw=raw)
    return {(b, s, m): p for (_, b, s, m), p in raw.items()}


def _fraction(budget: str) -> float | None:
    return float(budget[1:]) / 100 if budget.startswith("p") and budget[1:].isdigit() else None


def curve_figure(rows: list[dict], out: Path) -> Path | None:
    """Budget curve: top row absolute bpb / KL per method (mean over seeds, seed std as bars),
    bottom row the paired difference with ``random`` and its CI; ``full`` and base as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paired = paired_vs_random(rows)
    if not rows:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    styles = {  # colour, marker, and a small shift along x so that bars at one budget stay apart
        "random": ("tab:grey", "o", 1.0),
        "grads": ("tab:blue", "s", 0.95),
        "grads_paper": ("tab:orange", "D", 1.05),
    }
    for j, metric in enumerate(METRICS):
        top, bottom = axes[0][j], axes[1][j]
        for sel, (colour, marker, shift) in styles.items():
            pts: dict[float, list[float]] = {}
            for r in rows:
                x = _fraction(str(r["budget"]))
                if r["selector"] == sel and x is not None and r.get(metric) == r.get(metric):
                    pts.setdefault(x, []).append(float(r[metric]))
            if not pts:
                continue
            xs = sorted(pts)
            top.errorbar([x * shift for x in xs], [np.mean(pts[x]) for x in xs],
                         yerr=[np.std(pts[x]) for x in xs], color=colour, marker=marker,
                         capsize=3, label=sel)  # fmt: skip
            diffs = [(x, paired.get((f"p{round(x * 100)}", sel, metric))) for x in xs]
            diffs = [(x, p) for x, p in diffs if p is not None]
            if diffs:
                xd = [x * shift for x, _ in diffs]
                mean = [p.mean for _, p in diffs]
                err = [[p.mean - p.lo for _, p in diffs], [p.hi - p.mean for _, p in diffs]]
                bottom.errorbar(xd, mean, yerr=err, color=colour, marker=marker, capsize=3)
        _reference_lines(top, rows, metric)
        bottom.axhline(0, color="tab:grey", lw=1)
        top.set_title(LABELS[metric])
        bottom.set_ylabel(f"{LABELS[metric]} − random (95 % CI)")
        bottom.set_xlabel("budget (share of the pool, log scale)")
        for ax in (top, bottom):  # fixed ticks: one budget alone still draws a readable axis
            ax.set_xscale("log")
            ax.set_xlim(0.007, 0.4)
            ax.set_xticks(BUDGET_TICKS, [f"{round(t * 100)} %" for t in BUDGET_TICKS])
            ax.minorticks_off()
    axes[0][0].legend(fontsize=8)
    n_pool = max(int(r.get("n_pool") or 0) for r in rows)
    fig.suptitle(f"financial, a pool of {n_pool:,} samples: learning vs forgetting by budget")
    fig.tight_layout()
    fig.savefig(out, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return out


def _reference_lines(ax, rows: list[dict], metric: str) -> None:
    """``full`` (mean over its runs) and the base model as horizontal lines."""
    full = [
        float(r[metric]) for r in rows if r["selector"] == "full" and r.get(metric) == r.get(metric)
    ]
    if full:
        ax.axhline(sum(full) / len(full), color="tab:green", ls="--", lw=1, label="full")
    base = [r.get(f"base_{metric}") for r in rows]
    base = [float(b) for b in base if b is not None and b == b]
    if metric == "general_kl" and not base:
        base = [0.0]  # KL(base ‖ base), not collected
    if base:
        ax.axhline(base[0], color="black", ls=":", lw=1, label="base")


# the columns of the pool-size comparison: (heading, collected CSV relative to ``results/``)
POOL_COLUMNS = (
    ("1,000, float32 (Table 1)", "tables/financial/financial.csv"),
    ("1,000, bf16 (bridge)", "poolscale/financial_bridge/financial_bridge.csv"),
    ("whole pool, bf16", "poolscale/financial_pool/financial_pool.csv"),
)


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def pool_size_table(
    columns: dict[str, list[dict]], budget: str = "p5", methods: list[str] | None = None
) -> str:
    """Markdown: rows = method x metric, columns = pool (``columns``: name -> collected rows), each
    cell the paired difference with random at ``budget``, its 95 % CI and its number of seeds.
    ``methods``: the rows (default: every method with a pairing at ``budget`` in any column)."""
    from grads.report.paired import paired_cell

    paired = {name: paired_vs_random(rows) for name, rows in columns.items()}
    if methods is None:
        methods = sorted({s for p in paired.values() for (b, s, _) in p if b == budget})
    head = "| method | metric | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for sel in methods:
        for metric in METRICS:
            cells = []
            for name in columns:
                p = paired[name].get((budget, sel, metric))
                cells.append(paired_cell(metric, p) + (f" ({_seeds(p.n_seeds)})" if p else ""))
            lines.append(f"| {sel} | {LABELS[metric]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def absolute_table(columns: dict[str, list[dict]], budget: str, methods: list[str]) -> str:
    """Markdown: each method's mean held-out bpb and KL over its seeds at ``budget`` (``full`` at
    any budget) per column, the base model first and each column's pool and subset sizes last."""
    import numpy as np

    def runs(rows, sel):
        return [
            r for r in rows if r["selector"] == sel and (sel == "full" or r["budget"] == budget)
        ]

    def mean(values) -> str:
        v = [float(x) for x in values if x is not None and x == x]
        return f"{np.mean(v):.4f}" if v else "–"

    lines = ["| method | metric | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for metric in METRICS:  # KL(base ‖ base) is 0 and not collected
        cells = [mean([r.get(f"base_{metric}") for r in rows][:1]) for rows in columns.values()]
        if any(c != "–" for c in cells):
            lines.append(f"| base model | {LABELS[metric]} | " + " | ".join(cells) + " |")
    for sel in ["random", *[m for m in methods if m != "random"]]:
        for metric in METRICS:
            cells = []
            for rows in columns.values():
                got = runs(rows, sel)
                cells.append(mean([r.get(metric) for r in got])
                             + (f" ({_seeds(len({r['seed'] for r in got}))})" if got else ""))  # fmt: skip
            lines.append(f"| {sel} | {LABELS[metric]} | " + " | ".join(cells) + " |")
    sizes = []
    for rows in columns.values():
        got = runs(rows, "random")
        sizes.append(f"{int(got[0]['n_pool']):,} / {int(got[0]['n_selected']):,}" if got else "–")
    lines.append("| pool / subset | samples | " + " | ".join(sizes) + " |")
    return "\n".join(lines) + "\n"


def _phase(row: dict) -> str:
    """The phase of ``grads.paper.poolscale`` that ran a whole-pool cell (or ``bridge``)."""
    if int(row.get("n_pool") or 0) < 10_000:
        return "bridge"
    if row["selector"] == "full":
        return "full"
    if row["budget"] != "p5":
        return "curve"
    return "main_p5" if int(row["seed"]) == 0 else "seeds_p5"


def compute_table(rows: list[dict]) -> str:
    """Markdown: the hours each phase's cells spent fine-tuning and evaluating (their stages' own
    ``wall_s``, read back from the cache or not), then the shared warm-up and features stages
    (the largest ``warmup_s`` / ``features_s`` of each pool: every attempt, one computation)."""

    def hours(values) -> str:
        return f"{sum(float(v or 0) for v in values) / 3600:.1f}"

    lines = ["| phase | cells | fine-tune (h) | evaluation (h) |", "|---|---|---|---|"]
    phases: dict[str, list[dict]] = {}
    for r in rows:
        phases.setdefault(_phase(r), []).append(r)
    for name in ("main_p5", "seeds_p5", "full", "curve", "bridge"):
        got = phases.get(name, [])
        if got:
            ft, ev = (hours(r.get(f"{k}_s") for r in got) for k in JOB_STAGES)
            lines.append(f"| {name} | {len(got)} | {ft} | {ev} |")
    lines += ["", "| shared stage | pool | hours |", "|---|---|---|"]
    for pool in ("whole pool", "bridge"):
        got = [r for r in rows if (_phase(r) == "bridge") == (pool == "bridge")]
        for stage in ("warmup", "features"):
            top = max((float(r.get(f"{stage}_s") or 0) for r in got), default=0.0)
            if top:
                lines.append(f"| {stage} | {pool} | {top / 3600:.1f} |")
    return "\n".join(lines) + "\n"


def pool_size_report(results: Path, out: Path | None = None, budget: str = "p5") -> Path | None:
    """``pool_size.md``: the whole pool's comparisons at ``budget`` beside the same comparisons on
    the 1,000-sample pool (:data:`POOL_COLUMNS`), read from the collected CSVs under ``results``
    (the repository's ``results/``) alone, so the file regenerates from them. None (nothing
    written) until the whole pool has collected rows."""
    columns = {name: load_rows(results / rel) for name, rel in POOL_COLUMNS}
    whole = columns[POOL_COLUMNS[-1][0]]
    if not any(r["selector"] == "random" for r in whole):
        return None
    methods = sorted({r["selector"] for r in whole if r["selector"] != "random"})
    out = out or results / "poolscale" / "financial_pool" / "pool_size.md"
    sources = ", ".join(f"`{rel}`" for _, rel in POOL_COLUMNS)
    text = (
        f"# financial: the whole pool beside the 1,000-sample pool ({budget[1:]} %)\n\n"
        f"Generated from {sources} by `grads.paper.poolscale_views.pool_size_report`.\n\n"
        f"## mean over seeds ({budget[1:]} %; `full`: the whole pool, 3 epochs)\n\n"
        + absolute_table(columns, budget, methods)
        + f"\n## paired difference vs random at {budget[1:]} % (95 % CI over items and seeds)\n\n"
        + pool_size_table(columns, budget, methods)
        + "\n## compute of the whole pool's phases and the bridge (hours of wall time)\n\n"
        "Fine-tune and evaluation hours of each phase's cells; the shared warm-up and features "
        "stages (gradient norms and IFD; the baselines' representation passes are not in the "
        "CSVs) counted once per pool.\n\n"
        + compute_table(columns[POOL_COLUMNS[-1][0]] + columns[POOL_COLUMNS[1][0]])
    )
    write_text(out, text)
    return out


def _selected(run_dir: Path) -> tuple[str, set[str]] | None:
    """``(selector, selected ids)`` of a finished job folder (``metrics.json`` → select stage)."""
    mfile = run_dir / "metrics.json"
    if not mfile.is_file():
        return None
    m = read_json(mfile)
    sel = Path(m.get("artefacts", {}).get("select", "")) / "selection.jsonl"
    if not sel.is_file():
        return None
    return str(m["selector"]), {r["id"] for r in read_jsonl(sel)}


def overlap(a: set[str], b: set[str], n_pool: int) -> dict:
    """Shared samples of two subsets of one pool, and what two random draws of those sizes share."""
    k = min(len(a), len(b))
    return {"k": k, "shared": len(a & b), "fraction": len(a & b) / k if k else None,
            "chance": k / n_pool if n_pool else None}  # fmt: skip


def stability_report(
    runs_dir: Path, results_root: Path, selections: Path | None = None
) -> dict | None:
    """Overlap of each 5 % subset under warm-up seed 1 with its seed-0 subset: on the whole pool
    (seed 0 from ``main_p5``) and on the 1,000-sample pool (seed 0 from the committed selections,
    ``selections``, default ``results/tables/financial/selections``). Written to
    ``<results_root>/financial_pool/stability.{json,md}``."""
    if selections is None:
        from grads.constants import REPO_ROOT

        selections = REPO_ROOT / "results" / "tables" / "financial" / "selections"
    out: dict[str, dict] = {}
    parts = {"stability_whole": runs_dir / "main_p5", "stability_1k": None}
    for part, seed0_dir in parts.items():
        for job in sorted(p.parent for p in (runs_dir / part).rglob("metrics.json")):
            got = _selected(job)
            if got is None:
                continue
            sel, seed1 = got
            n_pool = int(read_json(job / "metrics.json").get("n_pool") or 0)
            seed0 = _seed0(sel, seed0_dir, selections)
            if seed0:
                out.setdefault(part, {})[sel] = overlap(seed0, seed1, n_pool)
    if not out:
        return None
    folder = results_root / "financial_pool"
    write_json(folder / "stability.json", out)
    write_text(folder / "stability.md", stability_table(out))
    return out


def stability_table(out: dict[str, dict]) -> str:
    """Markdown of :func:`stability_report`'s ``stability.json`` (it regenerates from the JSON)."""
    lines = [
        "| pool | method | shared of k | fraction | two random draws |",
        "|---|---|---|---|---|",
    ]
    for part, by_sel in out.items():
        for sel, o in sorted(by_sel.items()):
            lines.append(f"| {part.removeprefix('stability_')} | {sel} | {o['shared']} of {o['k']} "
                         f"| {o['fraction']:.2f} | {o['chance']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _seed0(sel: str, seed0_dir: Path | None, selections: Path) -> set[str] | None:
    """The seed-0 subset of ``sel`` at 5 %: a job of ``seed0_dir``, or the committed selection."""
    if seed0_dir is None:
        f = selections / f"{sel}_p5_seed0.jsonl"
        return {r["id"] for r in read_jsonl(f)} if f.is_file() else None
    for mfile in sorted(seed0_dir.rglob("metrics.json")):
        got = _selected(mfile.parent)
        if got and got[0] == sel:
            return got[1]
    return None
