"""Collect a sweep's ``metrics.json`` files into paper-style tables and plots.

Re-runnable and tolerant: jobs without a ``metrics.json`` (crashed, killed, still running) are listed,
never fatal. The collected long-form CSV is the source of truth; every table and plot can be rebuilt
from it alone (``--from-csv``), so a results section never depends on raw run folders.

Layout (as in the GrADS paper): one table per domain, rows = methods (selectors), and for each budget
the columns domain accuracy, general accuracy and forgetting, as ``mean ± std`` over seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from grads.io import write_text

log = logging.getLogger(__name__)

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
_BUDGET_ORDER = {"p5": 5, "p10": 10, "p25": 25, "p50": 50, "p100": 100, "auto": 1000}


def collect(sweep_dir: str | Path) -> tuple[list[dict], list[str]]:
    """All ``metrics.json`` rows under ``sweep_dir`` plus the job folders that have none."""
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
        row = {k: m.get(k) for k in ID_COLS + METRIC_COLS}
        cost = m.get("cost", {})
        row["finetune_s"] = cost.get("finetune", {}).get("wall_s")
        row["select_s"] = cost.get("select", {}).get("wall_s")
        row["finetune_tokens"] = cost.get("finetune", {}).get("tokens")
        for task, res in (m.get("tasks") or {}).items():
            if isinstance(res, dict) and "acc" in res:
                row[f"task/{task}"] = res["acc"]
        row["job"] = str(job.relative_to(sweep_dir))
        rows.append(row)
    return rows, missing


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def _fmt(mean: float, std: float, n: int, scale: float = 100.0) -> str:
    if n == 0:
        return "–"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if n > 1 else f"{mean * scale:.1f}"


def _full_once(df):
    """``full`` ignores the budget: its runs under several budgets are one run (a cache hit)."""
    keys = [c for c in ("domain", "seed", "model", "trainer_mode") if c in df.columns]
    full = df[df["selector"] == "full"].drop_duplicates(subset=keys)
    return full


def paper_tables(df) -> dict[str, object]:
    """One wide table per domain: rows = selectors, columns = (budget, metric) as mean ± std (%)."""
    import pandas as pd

    out = {}
    metrics = [
        ("domain_acc", "Domain acc"),
        ("general_acc", "General acc"),
        ("forgetting", "Forgetting"),
    ]
    for domain, ddf in df.groupby("domain", sort=True):
        budgets = sorted(ddf["budget"].dropna().unique(), key=lambda b: _BUDGET_ORDER.get(b, 999))
        table = {}
        for sel, sdf in ddf.groupby("selector", sort=False):
            row = {}
            for b in budgets:
                bdf = sdf[sdf["budget"] == b] if sel != "full" else _full_once(sdf)
                for col, label in metrics:
                    row[(b if sel != "full" else b, label)] = _fmt(*_mean_std(bdf[col].tolist()))
                row[(b, "n")] = str(len(bdf)) if len(bdf) else "–"
            table[sel] = row
        wide = pd.DataFrame.from_dict(table, orient="index")
        wide.columns = pd.MultiIndex.from_tuples(wide.columns)
        order = [s for s in ("full", "random", "grads") if s in wide.index]
        wide = wide.loc[order + sorted(s for s in wide.index if s not in order)]
        out[domain] = wide
    return out


def cost_table(df):
    """Selection cost (warm-up + features + select) next to full-data fine-tuning, per domain/method."""
    import pandas as pd

    rows = []
    for (domain, sel), g in df.groupby(["domain", "selector"]):
        full = df[(df["domain"] == domain) & (df["selector"] == "full")]["finetune_s"]
        rows.append(
            {
                "domain": domain,
                "selector": sel,
                "selection_cost_s": round(float(g["selection_cost_s"].mean()), 1),
                "select_stage_s": round(float(g["select_s"].mean()), 1)
                if "select_s" in g
                else None,
                "finetune_s": round(float(g["finetune_s"].mean()), 1),
                "full_finetune_s": round(float(full.mean()), 1) if len(full) else None,
            }
        )
    return pd.DataFrame(rows)


def plots(df, out_dir: Path) -> list[Path]:
    """Domain gain vs forgetting per method, and domain accuracy vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for domain, ddf in df.groupby("domain"):
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        markers = {}
        for i, (sel, g) in enumerate(ddf.groupby("selector")):
            groups = [("all", _full_once(g))] if sel == "full" else list(g.groupby("budget"))
            for b, gb in groups:
                mk = markers.setdefault(b, "osD^vP*"[len(markers) % 7])
                mg, sg, n = _mean_std(gb["domain_gain"].tolist())
                mf, sf, _ = _mean_std(gb["forgetting"].tolist())
                if n == 0 or math.isnan(mg) or math.isnan(mf):
                    continue
                ax.errorbar(
                    mf * 100,
                    mg * 100,
                    xerr=sf * 100,
                    yerr=sg * 100,
                    fmt=mk,
                    color=f"C{i}",
                    capsize=2,
                    label=f"{sel} ({b})",
                )
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(0, color="grey", lw=0.6)
        ax.set_xlabel("forgetting (general acc lost, pts) →  worse")
        ax.set_ylabel("domain gain (pts) ↑")
        ax.set_title(f"{domain}: learn more (up), forget less (left)")
        ax.legend(fontsize=7, ncol=2, loc="best")
        fig.tight_layout()
        p = out_dir / f"gain_vs_forgetting_{domain}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)

        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        budgets = sorted(ddf["budget"].dropna().unique(), key=lambda b: _BUDGET_ORDER.get(b, 999))
        xs = list(range(len(budgets)))
        for i, (sel, g) in enumerate(ddf.groupby("selector")):
            if sel == "full":
                m, s, n = _mean_std(g["domain_acc"].tolist())
                if n:
                    ax.axhline(m * 100, color="k", ls="--", lw=1, label="full pool")
                continue
            ys = [_mean_std(g[g["budget"] == b]["domain_acc"].tolist()) for b in budgets]
            ax.errorbar(
                xs,
                [y[0] * 100 for y in ys],
                yerr=[y[1] * 100 for y in ys],
                marker="o",
                color=f"C{i}",
                capsize=2,
                label=sel,
            )
        ax.set_xticks(xs, budgets)
        ax.set_xlabel("budget")
        ax.set_ylabel("domain accuracy (%)")
        ax.set_title(f"{domain}: accuracy vs budget")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"acc_vs_budget_{domain}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def render(df, out_dir: str | Path, title: str = "results") -> dict[str, Path]:
    """Write CSV, Markdown and LaTeX tables and the plots for a long-form results frame."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    csv_path = out_dir / f"{title}.csv"
    write_text(csv_path, df.to_csv(index=False))
    written["csv"] = csv_path
    md, tex = [f"# {title}\n"], []
    for domain, wide in paper_tables(df).items():
        md += [
            f"\n## {domain}\n",
            "Accuracy and forgetting in points (%), mean ± std over seeds; n = number of runs.\n\n",
            _markdown(wide),
            "\n",
        ]
        tex += [f"% {domain}\n", wide.to_latex(escape=True), "\n"]
    costs = cost_table(df)
    md += ["\n## cost (seconds)\n\n", costs.to_markdown(index=False), "\n"]
    write_text(out_dir / f"{title}.md", "".join(md))
    write_text(out_dir / f"{title}.tex", "".join(tex))
    written["md"], written["tex"] = out_dir / f"{title}.md", out_dir / f"{title}.tex"
    for p in plots(df, out_dir):
        written[p.stem] = p
    return written


def _markdown(wide) -> str:
    cols = [f"{b} {m}" for b, m in wide.columns]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for idx, row in wide.iterrows():
        lines.append(f"| {idx} | " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``grads-report SWEEP_DIR [--out DIR]`` or ``grads-report --from-csv results.csv``."""
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "sweep_dir", nargs="*", help="sweep/run folders to collect (searched recursively)"
    )
    ap.add_argument("--from-csv", help="rebuild tables and plots from a collected CSV instead")
    ap.add_argument("--out", default=None, help="output folder (default: <sweep_dir>/report)")
    ap.add_argument("--title", default="results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_csv:
        df = pd.read_csv(args.from_csv)
        out = Path(args.out or Path(args.from_csv).parent)
    else:
        if not args.sweep_dir:
            ap.error("give a sweep folder or --from-csv")
        rows, missing = [], []
        for d in args.sweep_dir:
            r, m = collect(d)
            rows += r
            missing += m
        for m in missing:
            print(f"missing or failed job: {m}")
        if not rows:
            raise SystemExit(f"no metrics.json found under {args.sweep_dir}")
        df = pd.DataFrame(rows)
        out = Path(args.out or Path(args.sweep_dir[0]) / "report")
    written = render(df, out, args.title)
    print(Path(written["md"]).read_text())
    print("written:", ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
