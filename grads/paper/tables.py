"""Collect a sweep's ``metrics.json`` files into paper-style tables and plots.

What ``grads-report`` (``scripts/make_tables.py``) writes: per domain, Table 1 (mean ± std over
seeds; Table 2's runs left out but the best other GrADS rule), the paired comparison of every method
with a reference method (default ``random``) at the same budget and seeds, with bootstrap 95 % CIs
over items and seeds (▲ / ▼ for significant wins / losses) and a forest plot; Table 2 (the ``grads`` rule x gradient source grids of the headline
domain and forgetting metrics); Table 2 across domains with its heat map, the default decision, the
costs. The per-item results the paired tables need are written next to the CSV
(``<title>_items.json.gz``), so ``--from-csv`` rebuilds everything from the CSV alone.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from grads.errors import UserError, reported
from grads.evaluation.metrics import ITEM_METRICS
from grads.io import write_text
from grads.paper.decisions import DECISION_METRICS, ablation_summary, default_decision
from grads.paper.frames import as_current_default, collect, table1_frame, with_default_cell
from grads.paper.protocol import ABLATION_PREFIX, BEST_OTHER, CHEAP_VARIANTS, is_ablation
from grads.report.collect import read_csvs, with_items, write_items
from grads.report.costs import cost_model, cost_table
from grads.report.paired import PAIRED_METRICS, paired_cell, paired_tables
from grads.report.plots import forest_plot, plots
from grads.report.tables import budget_key, latex, markdown, paper_tables


def render(
    df,
    out_dir: str | Path,
    title: str = "results",
    items: list[dict] | None = None,
    reference: str = "random",
    metrics: list[str] | None = None,
) -> dict[str, Path]:
    """Write CSV, Markdown and LaTeX tables and the plots for a long-form results frame.

    Args:
        df: one row per run (the collected CSV).
        out_dir: output folder.
        title: file stem.
        items: per run ``{"job", "items"}`` (the runs' per-item results): enables the paired tables
            and is written to ``<title>_items.json.gz`` for ``--from-csv`` rebuilds.
        reference: the method every other one is paired with.
        metrics: paired-table metrics (default :data:`PAIRED_METRICS`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    csv_path = out_dir / f"{title}.csv"
    write_text(csv_path, df.to_csv(index=False))
    written["csv"] = csv_path
    md, tex = [f"# {title}\n"], []
    # the CSV and the costs keep the runs as they ran; the tables name them under today's default
    runs, df = df, with_default_cell(as_current_default(df))
    t1 = table1_frame(df)  # Table 1: no ablation runs but the best other GrADS rule of each domain
    for domain, wide in paper_tables(t1).items():
        md += [
            f"\n## {domain}\n",
            "Accuracy and forgetting in points (%), mean ± std over seeds; n = number of runs"
            + ("; continuous metrics in their own units" if len(wide.columns) > 4 else "")
            + ".\n\n",
            markdown(wide),
            _best_other_note(wide),
            _short_subset_note(t1[t1["domain"] == domain]),
            "\n",
        ]
        tex += [f"% {domain}\n", latex(wide), "\n"]
    if items:
        written["items"] = write_items(out_dir / f"{title}_items.json.gz", items)
        p_md, p_tex = _paired_sections(t1, df, items, reference, metrics, out_dir)
        md, tex = md + p_md, tex + p_tex
    summary = ablation_summary(df, reference)  # Table 2 across domains: ranked once, read twice
    a_md, a_tex, a_png = _ablation_section(summary, reference, out_dir)
    md, tex = md + a_md, tex + a_tex
    md += _decision_section(df, items, summary)
    if a_png:
        written[a_png.stem] = a_png
    costs = cost_table(runs)
    md += ["\n## cost (seconds)\n\n", costs.to_markdown(index=False), "\n"]
    model = cost_model(runs, exclude=CHEAP_VARIANTS)
    if len(model):
        md += [
            "\n## cost model (minutes per stage, jobs that computed it)\n\n",
            model.to_markdown(index=False),
            "\n",
        ]
    write_text(out_dir / f"{title}.md", "".join(md))
    write_text(out_dir / f"{title}.tex", "".join(tex))
    written["md"], written["tex"] = out_dir / f"{title}.md", out_dir / f"{title}.tex"
    for p in plots(t1, out_dir):
        written[p.stem] = p
    return written


def _short_subset_note(ddf) -> str:
    """A line per method and budget whose subset is smaller than the budget's (the largest
    ``n_selected`` of that budget): e.g. IFD without a score for one-token answers. Generated, so a
    reader of the table cannot miss it."""
    if "n_selected" not in ddf.columns:
        return ""
    tuned = ddf[ddf["selector"] != "full"].dropna(subset=["n_selected"])
    lines = []
    for budget, b in tuned.groupby("budget", sort=False):
        want = int(b["n_selected"].max())
        for sel, n in b.groupby("selector", sort=True)["n_selected"].min().items():
            if int(n) < want:
                lines.append(f"{sel} ({budget}) trained on {int(n)} samples, not {want}")
    if not lines:
        return ""
    return "\nSmaller subsets: " + "; ".join(lines) + " (the selector had fewer candidates).\n"


def _best_other_note(wide) -> str:
    rows = [str(s) for s in wide.index if str(s).endswith(BEST_OTHER)]
    if not rows:
        return ""
    return (
        f"\n{', '.join(rows)}: of the Table 2 runs other than the default rule, the one with the lowest "
        "held-out domain bpb at 5 %; picked on the same evaluation it is reported on, so optimistic.\n"
    )


def _paired_sections(
    t1, df, items: list[dict], reference: str, metrics: list[str] | None, out_dir: Path
):
    """Markdown and LaTeX of the paired tables (Table 1's runs ``t1``) and, when the runs ``df``
    include them, the ablation grids (Table 2); a forest plot per domain in ``out_dir``."""
    import pandas as pd

    both = pd.concat([t1, df[df["selector"].map(is_ablation)]], ignore_index=True)
    rows = with_items(both.to_dict("records"), items)
    raw: dict = {}
    paired = paired_tables(rows, reference, metrics, raw=raw)
    md, tex = [], []
    t1_raw = {k: v for k, v in raw.items() if not is_ablation(k[2])}  # the grid has a heat map
    for domain in paired:
        forest_plot(t1_raw, str(domain), out_dir, reference)
    for domain, full in paired.items():
        wide = full.loc[[s for s in full.index if not is_ablation(s)]]
        md += [
            f"\n## {domain}: paired difference vs {reference}\n",
            "Mean paired difference (method − reference) over the same items and seeds, "
            "[95 % bootstrap CI over items and seeds]; accuracies in points; "
            "▲ significant win, ▼ significant loss (CI excludes 0).\n\n",
            markdown(wide),
            "\n",
        ]
        tex += [f"% {domain}: paired difference vs {reference}\n", latex(wide), "\n"]
    # Table 2 (the headline domain and forgetting metrics): rule x gradient source grids
    for metric in [m for m in (metrics or PAIRED_METRICS) if m in ITEM_METRICS][:2]:
        label = ITEM_METRICS[metric].label
        for where, grid in ablation_tables(paired, label).items():
            md += [
                f"\n## {where}: ablation, {label} vs {reference} (rule x gradient source)\n",
                "Rows: the `grads` selection rule; columns: the gradient norms in the signal "
                "(input embedding, LM head, both). Cells as in the paired table.\n\n",
                markdown(grid),
                "\n",
            ]
            tex += [f"% {where}: ablation, {label}\n", latex(grid), "\n"]
    return md, tex


def _ablation_section(summary: tuple, reference: str, out_dir: Path):
    """Table 2 across domains (:func:`ablation_summary`): Markdown, LaTeX and a heat map of the
    domain-bpb differences (rule x source, one panel per domain), when the runs have ablation runs."""
    import pandas as pd

    table, winner, default = summary
    if table.empty:
        return [], [], None
    shown = table.copy()
    for c in shown.columns:
        if c.startswith(("Δ", "mean Δ")):
            shown[c] = shown[c].map(lambda v: "–" if v != v else f"{v:+.4f}")
    shown["mean rank"] = shown["mean rank"].map(lambda v: f"{v:.1f}")
    shown.columns = pd.MultiIndex.from_tuples([("", c) for c in shown.columns])
    n_dom = int(table["domains"].max())
    first = str(table.index[table["domains"] == n_dom][0])
    verdict = (
        f"Winner of the `grads` rule x source grid by mean rank over the {n_dom} domain(s) with "
        f"ablation runs: **{winner}**"
        + (" (the current default)" if winner == default else f"; the current default is {default}")
        + (f"; among all GrADS variants, {first} ranks first" if first != winner else "")
        + ". Ranks ignore noise: whether the winner replaces the default is decided by its paired "
        "comparison with the default (next section, from the per-item results).\n"
        if winner
        else "No ablation run is present in every domain yet.\n"
    )
    md = [
        f"\n## ablation across domains: difference vs {reference} at 5 % (seed-matched run means)\n",
        "Δ = method − reference per domain (bpb and KL: lower is better); rank within each domain by "
        "Δ bpb (1 = best), averaged over the domains.\n\n",
        markdown(shown),
        "\n",
        verdict,
    ]
    tex = ["% ablation across domains\n", latex(shown), "\n"]
    return md, tex, _ablation_plot(table, out_dir)


def _ablation_plot(table, out_dir: Path) -> Path:
    """Heat map per domain: rows = rules, columns = gradient sources, colour = Δ bpb vs reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [c for c in table.columns if c.startswith("Δ bpb ")]
    rules = sorted({s.split(".")[1] for s in table.index if is_ablation(s)})
    sources = [s for s in ("embed", "lm_head", "embed+lm_head") if any(table.index.str.endswith(s))]
    vmax = float(np.nanmax(np.abs(table[cols].to_numpy()))) or 1.0
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 1.2, 0.45 * len(rules) + 1.6))
    axes = np.atleast_1d(axes)
    for ax, col in zip(axes, cols):
        grid = np.full((len(rules), len(sources)), np.nan)
        for i, r in enumerate(rules):
            for j, src in enumerate(sources):
                name = f"{ABLATION_PREFIX}{r}.{src}"
                if name in table.index:
                    grid[i, j] = table.loc[name, col]
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if v == v:
                dark = abs(v) > 0.6 * vmax
                ax.text(
                    j,
                    i,
                    f"{v:+.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(sources)), sources, fontsize=7)
        ax.set_yticks(range(len(rules)), rules, fontsize=7)
        ax.set_title(col.replace("Δ bpb ", ""), fontsize=9)
    fig.colorbar(im, ax=list(axes), label="Δ domain bpb vs random (blue = better)", shrink=0.8)
    fig.suptitle("Table 2: GrADS rule x gradient source", fontsize=9)
    p = out_dir / "ablation_domain_bpb.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return p


def _decision_section(df, items: list[dict] | None, summary: tuple) -> list[str]:
    """Markdown of :func:`default_decision`: the winner against the default, per domain
    (``summary``: :func:`ablation_summary`'s result, shared with the ablation section)."""
    rows, verdict = default_decision(df, items, summary=summary)
    if verdict in (None, "default") and not rows:
        return []
    _, winner, default = summary
    head = "| domain | seeds | " + " | ".join(ITEM_METRICS[m].label for m in DECISION_METRICS)
    lines = [head + " |", "|---|---|" + "---|" * len(DECISION_METRICS)]
    for r in rows:
        cells = [paired_cell(m, r[m]) for m in DECISION_METRICS]
        lines.append(f"| {r['domain']} | {r['seeds']} | " + " | ".join(cells) + " |")
    text = {
        "change": f"**change the default to {winner}**",
        "keep": f"**keep {default}** (the winner's edge is not significant, or it is worse somewhere)",
        None: "**not decided** (a domain has no Table 2 run of the winner or the default yet)",
    }[verdict]
    return [
        f"\n## the default rule: {winner} vs {default} at 5 % (paired)\n",
        "Winner − default over the same items and seeds, [95 % bootstrap CI]; lower is better on "
        "both. Rule: change the default only if the winner is significantly better on domain bpb in "
        "at least one domain and significantly worse on neither metric in any domain.\n\n",
        "\n".join(lines) + "\n",
        f"\nDecision over {', '.join(r['domain'] for r in rows)}: {text}.\n",
    ]


def ablation_tables(paired: dict[str, object], metric_label: str) -> dict[str, object]:
    """Table 2 layout: per domain and budget, rows = GrADS rules, columns = gradient sources.

    Args:
        paired: :func:`paired_tables` output (rows = methods, columns = (budget, metric label)).
        metric_label: which paired column fills the grid (e.g. ``ITEM_METRICS["domain_bpb"].label``).

    Returns:
        ``{"<domain> <budget>": grid}`` for every domain/budget with ``grads.<rule>.<source>`` rows.
    """
    import pandas as pd

    out = {}
    for domain, wide in paired.items():
        names = [s for s in wide.index if is_ablation(s)]
        for budget in sorted({b for b, _ in wide.columns}, key=budget_key):
            if not names or (budget, metric_label) not in wide.columns:
                continue
            cells: dict[str, dict[str, str]] = {}
            for name in names:
                _, rule, source = name.split(".")
                cells.setdefault(rule, {})[source] = wide.loc[name, (budget, metric_label)]
            grid = pd.DataFrame.from_dict(cells, orient="index").fillna("–")
            if (grid == "–").all().all():  # no ablation run at this budget
                continue
            sources = [c for c in ("embed", "lm_head", "embed+lm_head") if c in grid.columns]
            grid = grid[sources + sorted(c for c in grid.columns if c not in sources)]
            grid = grid.sort_index()
            grid.columns = pd.MultiIndex.from_tuples([(metric_label, c) for c in grid.columns])
            out[f"{domain} {budget}"] = grid
    return out


def main(argv: list[str] | None = None) -> None:
    """``grads-report SWEEP_DIR [--out DIR]`` or ``grads-report --from-csv results.csv``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "sweep_dir", nargs="*", help="sweep/run folders to collect (searched recursively)"
    )
    ap.add_argument(
        "--from-csv",
        nargs="+",
        help="rebuild tables and plots from collected CSVs instead (several: merged, e.g. one per domain)",
    )
    ap.add_argument("--out", default=None, help="output folder (default: <sweep_dir>/report)")
    ap.add_argument("--title", default="results")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these selectors (e.g. Table 1 without the ablation's grads.<rule>.<source> runs)",
    )
    ap.add_argument("--reference", default="random", help="method the paired tables compare to")
    ap.add_argument(
        "--paired-metrics", nargs="+", default=None, help=f"default: {' '.join(PAIRED_METRICS)}"
    )
    ap.add_argument(
        "-v", "--verbose", action="store_true", help="show the traceback of a user error"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.from_csv and not args.sweep_dir:
        ap.error("give a sweep folder or --from-csv")
    with reported("grads-report", args.verbose):  # a missing folder or CSV: one message
        _report(args)


def _report(args: argparse.Namespace) -> None:
    """:func:`main` after parsing: collect (or read the CSVs), filter, render, print."""
    import pandas as pd

    if args.from_csv:
        df, items = read_csvs([Path(p) for p in args.from_csv])
        out = Path(args.out or Path(args.from_csv[0]).parent)
    else:
        rows, missing = [], []
        for d in args.sweep_dir:
            if not Path(d).is_dir():
                raise UserError(f"no such folder: {d}")
            r, m = collect(d, keep_items=True)
            rows += r
            missing += m
        for m in missing:
            print(f"missing or failed job: {m}")
        if not rows:
            raise SystemExit(f"no metrics.json found under {args.sweep_dir}")
        items = [{"job": r["job"], "items": r.pop("items")} for r in rows if r.get("items")]
        for r in rows:
            r.pop("items", None)
        df = pd.DataFrame(rows)
        out = Path(args.out or Path(args.sweep_dir[0]) / "report")
    if args.methods:
        unknown = sorted(set(args.methods) - set(df["selector"]))
        if unknown:
            raise SystemExit(
                f"--methods: no runs of {unknown}; the runs have {sorted(set(df['selector']))}"
            )
        df = df[df["selector"].isin(args.methods)].reset_index(drop=True)
    written = render(df, out, args.title, items, args.reference, args.paired_metrics)
    print(Path(written["md"]).read_text())
    print("written:", ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
