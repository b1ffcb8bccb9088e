"""Collect a sweep's ``metrics.json`` files into paper-style tables and plots.

Re-runnable and tolerant: jobs without a ``metrics.json`` (crashed, killed, still running) are listed,
never fatal. The collected long-form CSV is the source of truth; every table and plot can be rebuilt
from it alone (``--from-csv``), so a results section never depends on raw run folders.

Layout (as in the GrADS paper): one table per domain, rows = methods (selectors), and for each budget
the columns domain accuracy, general accuracy and forgetting, as ``mean ± std`` over seeds, plus the
continuous metrics of the evaluation when the runs have them (held-out domain loss, KL to the base).

Paired comparisons: a second table per domain gives, for every method against a reference method
(default ``random``) at the same budget and seeds, the mean paired difference of each metric in
:data:`PAIRED_METRICS` and its bootstrap 95 % CI over items and seeds
(:func:`grads.evaluation.stats.paired_bootstrap`); ▲ marks a significant win, ▼ a significant loss.
The per-item results this needs are written next to the CSV (``<title>_items.json.gz``), so
``--from-csv`` rebuilds the paired tables too.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import math
import sys
from pathlib import Path

from grads.evaluation.metrics import ITEM_METRICS, headline_keys
from grads.io import read_json, write_text

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
EXTRA_COLS = [k for k in headline_keys() if k not in METRIC_COLS]
# The paired-comparison columns: the headline domain and forgetting metrics chosen by the measured
# noise floor (RESULTS.md, "Noise floor"), then the accuracies users expect beside them.
PAIRED_METRICS = ["domain_bpb", "general_kl", "domain_acc", "general_acc"]
# Continuous columns of the main table (mean ± std over seeds, raw units) when the runs have them.
CONTINUOUS_COLS = [("domain_bpb", "Domain bpb"), ("general_kl", "KL")]
_BUDGET_ORDER = {"p5": 5, "p10": 10, "p25": 25, "p50": 50, "p100": 100, "auto": 1000}


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
        row["grads_cell"] = _grads_cell(cfg, row["selector"])
        if keep_items:
            row["items"] = m.get("items") or {}
        rows.append(row)
    return rows, missing


STAGES = ("warmup", "features", "select", "finetune", "evaluate")


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


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def _fmt(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    if n == 0:
        return "–"
    m, sd = mean * scale, std * scale
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


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
        ("domain_acc", "Domain acc", 100.0, 1),
        ("general_acc", "General acc", 100.0, 1),
        ("forgetting", "Forgetting", 100.0, 1),
    ]
    metrics += [
        (col, label, 1.0, 3)
        for col, label in CONTINUOUS_COLS
        if col in df.columns and df[col].notna().any()
    ]
    for domain, ddf in df.groupby("domain", sort=True):
        budgets = sorted(ddf["budget"].dropna().unique(), key=lambda b: _BUDGET_ORDER.get(b, 999))
        table = {}
        for sel, sdf in ddf.groupby("selector", sort=False):
            row = {}
            for b in budgets:
                bdf = sdf[sdf["budget"] == b] if sel != "full" else _full_once(sdf)
                for col, label, scale, digits in metrics:
                    row[(b, label)] = _fmt(*_mean_std(bdf[col].tolist()), scale, digits)
                row[(b, "n")] = str(len(bdf)) if len(bdf) else "–"
            table[sel] = row
        wide = pd.DataFrame.from_dict(table, orient="index")
        wide.columns = pd.MultiIndex.from_tuples(wide.columns)
        order = [s for s in ("full", "random", "grads") if s in wide.index]
        wide = wide.loc[order + sorted(s for s in wide.index if s not in order)]
        out[domain] = wide
    return out


# --------------------------------------------------------------------------------------------------
# Paired comparisons against a reference method
# --------------------------------------------------------------------------------------------------
def _part(row: dict, metric: str) -> dict | None:
    part = ITEM_METRICS[metric].part
    return ((row.get("items") or {}).get("tuned") or {}).get(part)


def _paired_cell(metric: str, p) -> str:
    """``+1.2 [+0.3, +2.1] ▲``: accuracies in points, losses and KL in raw units."""
    if p is None:
        return "–"
    m = ITEM_METRICS[metric]
    scale, digits = (100.0, 1) if m.num in ("acc", "acc_norm") else (1.0, 4)
    mark = ""
    if p.significant:
        better = (p.mean > 0) == m.higher_is_better
        mark = " ▲" if better else " ▼"
    lo, hi, mean = p.lo * scale, p.hi * scale, p.mean * scale
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def paired_tables(
    rows: list[dict],
    reference: str = "random",
    metrics: list[str] | None = None,
    n_boot: int = 2000,
    raw: dict | None = None,
) -> dict[str, object]:
    """Per domain: rows = methods, columns = (budget, metric) paired difference vs ``reference``.

    Each method is paired with the reference at the same domain, model, trainer mode and budget,
    on the seeds both ran and the items both evaluated (:func:`grads.evaluation.stats.paired_bootstrap`);
    ``full``, which has no budget of its own, at every budget.
    ``raw``, when given, receives each comparison as ``{(domain, budget, method, metric): result}``
    (for :func:`forest_plot`).
    """
    import pandas as pd

    from grads.evaluation.stats import paired_bootstrap

    metrics = [m for m in (metrics or PAIRED_METRICS) if m in ITEM_METRICS]
    groups: dict[tuple, dict[str, dict]] = {}
    full: dict[tuple, dict] = {}
    for r in rows:
        if not r.get("items"):
            continue
        key = (r["domain"], r.get("model"), r.get("trainer_mode"), r["budget"])
        groups.setdefault(key, {}).setdefault(r["selector"], {})[r["seed"]] = r
        if r["selector"] == "full":
            full.setdefault(key[:3], {}).setdefault(r["seed"], r)
    # ``full`` ignores the budget (one run, as in :func:`paper_tables`): it is paired with the
    # reference at every budget, not only the one its sweep job was launched under
    for key, by_sel in groups.items():
        if key[:3] in full:
            by_sel.setdefault("full", full[key[:3]])
    out: dict[str, dict] = {}
    for (domain, _, _, budget), by_sel in sorted(groups.items(), key=lambda kv: str(kv[0])):
        ref = by_sel.get(reference)
        if not ref:
            continue
        table = out.setdefault(domain, {})
        for sel, by_seed in by_sel.items():
            seeds = sorted(set(by_seed) & set(ref))
            for metric in metrics:
                cell = "ref" if sel == reference else "–"
                a = [_part(by_seed[s], metric) for s in seeds]
                b = [_part(ref[s], metric) for s in seeds]
                if sel != reference and seeds and all(a) and all(b):
                    p = paired_bootstrap(a, b, metric, n_boot=n_boot)
                    cell = _paired_cell(metric, p)
                    if raw is not None:
                        raw[(domain, budget, sel, metric)] = p
                table.setdefault(sel, {})[(budget, ITEM_METRICS[metric].label)] = cell
    tables = {}
    for domain, table in out.items():
        wide = pd.DataFrame.from_dict(table, orient="index")
        budgets = sorted({b for b, _ in wide.columns}, key=lambda b: _BUDGET_ORDER.get(b, 999))
        cols = [(b, ITEM_METRICS[m].label) for b in budgets for m in metrics]
        wide = wide.reindex(columns=[c for c in cols if c in wide.columns]).fillna("–")
        wide.columns = pd.MultiIndex.from_tuples(wide.columns)
        order = [s for s in (reference, "full", "grads") if s in wide.index]
        tables[domain] = wide.loc[order + sorted(s for s in wide.index if s not in order)]
    return tables


ABLATION_PREFIX = "grads."  # conf/experiment/paper_ablation.yaml names runs grads.<rule>.<source>
# scripts/run_tables.py's cheap-selection rows (selector.name of each; tests keep the two in step)
CHEAP_VARIANTS = ("grads_w5", "grads_rec")
GRADS_VARIANTS = ("grads_paper", "grads_cover")  # GrADS selectors outside the rule x source grid
BEST_OTHER = " (best other rule)"  # suffix of Table 1's row for the best non-default ablation run
ABLATION_BUDGET = "p5"


def is_ablation(name: object) -> bool:
    """``grads.<rule>.<source>``: a Table 2 run (``experiment=paper_ablation``)."""
    name = str(name)
    return (
        name.startswith(ABLATION_PREFIX) and name.count(".") == 2 and not name.endswith(BEST_OTHER)
    )


def default_grads_run() -> str:
    """The ablation name of the ``grads`` selector's default (``conf/selector/grads.yaml``), e.g.
    ``grads.density_x_magnitude.embed+lm_head``: read from the config, so it follows a change of
    the default."""
    from grads.constants import conf_dir

    return _default_run(str(Path(conf_dir()) / "selector" / "grads.yaml"))


@functools.lru_cache(maxsize=4)
def _default_run(path: str) -> str:
    from omegaconf import OmegaConf

    sel = OmegaConf.load(path)
    return f"{ABLATION_PREFIX}{sel.rule}.{'+'.join(map(str, sel.layers))}"


def _ablation_runs(df):
    """The Table 2 runs (``grads.<rule>.<source>`` at 5 %)."""
    return df[df["selector"].map(is_ablation) & (df["budget"] == ABLATION_BUDGET)]


def _grads_cell(config_file: Path, selector: object) -> str | None:
    """The Table 2 cell (``grads.<rule>.<source>``) a ``grads`` or ablation run selected with, read
    from its resolved config: it stays true when the ``grads`` default changes later."""
    if selector != "grads" and not is_ablation(selector):
        return None
    from omegaconf import OmegaConf

    sel = OmegaConf.load(config_file).get("selector") or {}
    if "rule" not in sel or "layers" not in sel:
        return None
    return f"{ABLATION_PREFIX}{sel.rule}.{'+'.join(map(str, sel.layers))}"


def as_current_default(df, default: str | None = None):
    """Name the GrADS runs by what they ran, under the current default rule (``conf/selector/
    grads.yaml``): a ``grads`` run of another rule (an earlier default) becomes its Table 2 cell
    ``grads.<rule>.<source>``, and the runs of the default's cell are also Table 1's ``grads`` row
    wherever no ``grads`` run has that domain, budget and seed. Runs without ``grads_cell`` (CSVs
    collected before it) are taken as named."""
    import pandas as pd

    if "grads_cell" not in df.columns:
        return df
    default = default or default_grads_run()
    cell = df["grads_cell"]
    df = df.assign(
        selector=df["selector"].where(
            ~((df["selector"] == "grads") & cell.notna() & (cell != default)), cell
        )
    )
    keys = ["domain", "budget", "seed"]
    have = set(map(tuple, df.loc[df["selector"] == "grads", keys].to_numpy().tolist()))
    runs = df[df["selector"] == default]
    extra = runs[[tuple(k) not in have for k in runs[keys].to_numpy().tolist()]]
    return pd.concat([df, extra.assign(selector="grads")], ignore_index=True) if len(extra) else df


def with_default_cell(df, default: str | None = None):
    """Table 2's default cell is Table 1's ``grads`` run: the same selection (``conf/selector/
    grads.yaml``'s rule and layers), so ``scripts/run_tables.py`` does not train it twice. Per domain
    with ablation runs and no run named ``default``, the ``grads`` runs at 5 % of the seeds the
    ablation ran are added under the default's ablation name."""
    import pandas as pd

    default = default or default_grads_run()
    abl = _ablation_runs(df)
    extra = []
    for domain, ddf in abl.groupby("domain", sort=True):
        if (ddf["selector"] == default).any():
            continue
        same = (df["domain"] == domain) & (df["budget"] == ABLATION_BUDGET)
        grads = df[same & (df["selector"] == "grads") & df["seed"].isin(set(ddf["seed"]))]
        extra.append(grads.assign(selector=default))
    return pd.concat([df, *extra], ignore_index=True) if extra else df


def best_other_rule(df, metric: str = "domain_bpb", default: str | None = None) -> dict[str, str]:
    """Per domain, the ablation run (other than the default's) with the best mean ``metric`` at
    5 %: Table 1's "best other GrADS rule" row. Lower is better for losses (``*_bpb``, ``*_nll``,
    ``*_kl``), higher for accuracies. The pick is made on the same evaluation it is reported on, so
    its row is optimistic (a winner's curse); the footnote of Table 1 says so."""
    default = default or default_grads_run()
    lower = metric.endswith(("_bpb", "_nll", "_kl", "_ppl"))
    out = {}
    if metric not in df.columns:
        return out
    abl = _ablation_runs(df)
    for domain, ddf in abl.groupby("domain", sort=True):
        means = ddf[ddf["selector"] != default].groupby("selector")[metric].mean().dropna()
        if len(means):
            out[domain] = str(means.idxmin() if lower else means.idxmax())
    return out


def table1_frame(df, metric: str = "domain_bpb", default: str | None = None):
    """Table 1's runs: every run but Table 2's (ablation cells at 5 %), plus per domain the best
    other GrADS rule's runs renamed ``<name> (best other rule)``."""
    import pandas as pd

    best = best_other_rule(df, metric, default)
    main = df.drop(_ablation_runs(df).index)  # at 50 %, an earlier default's grads runs stay
    extra = [
        df[(df["domain"] == d) & (df["selector"] == name)].assign(selector=name + BEST_OTHER)
        for d, name in best.items()
    ]
    return pd.concat([main, *extra], ignore_index=True) if extra else main.reset_index(drop=True)


def ablation_summary(df, reference: str = "random", default: str | None = None):
    """Table 2 across domains: for every ``grads.<rule>.<source>`` run at 5 % (and, on the same
    domains and seeds, Table 1's other GrADS variants :data:`GRADS_VARIANTS`), its difference to
    ``reference`` (same domain and seed) in the headline domain metric (bpb, lower is better) and
    forgetting metric (KL, lower is better) per domain, their means over the domains, and the mean
    rank of the domain metric. Rows sorted by mean rank; the winner (the ``grads`` selector's rule
    to be) is the first ``grads.<rule>.<source>`` row present in every domain. Returns
    ``(table, winner or None, default)``."""
    import pandas as pd

    default = default or default_grads_run()
    cols = [c for c in ("domain_bpb", "general_kl") if c in df.columns]
    if "domain_bpb" not in cols:
        return pd.DataFrame(), None, default
    runs = df[df["budget"] == ABLATION_BUDGET]
    ref = runs[runs["selector"] == reference].groupby(["domain", "seed"])[cols].mean()
    abl = _ablation_runs(df)
    if abl.empty or ref.empty:
        return pd.DataFrame(), None, default
    # Table 1's other GrADS variants, on the domains and seeds of the ablation, ranked alongside
    ran = set(zip(abl["domain"], abl["seed"]))
    variants = runs[runs["selector"].isin(GRADS_VARIANTS)]
    variants = variants[[(d, s) in ran for d, s in zip(variants["domain"], variants["seed"])]]
    delta = pd.concat([abl, variants]).join(ref, on=["domain", "seed"], rsuffix="_ref")
    for c in cols:
        delta[f"d_{c}"] = delta[c] - delta[f"{c}_ref"]
    per = delta.groupby(["selector", "domain"])[[f"d_{c}" for c in cols]].mean().reset_index()
    per["rank"] = per.groupby("domain")["d_domain_bpb"].rank(method="average")
    domains = sorted(per["domain"].unique())
    table = per.pivot(index="selector", columns="domain", values="d_domain_bpb")[domains]
    table.columns = [f"Δ bpb {d}" for d in domains]
    table["mean Δ bpb"] = per.groupby("selector")["d_domain_bpb"].mean()
    if "general_kl" in cols:
        table["mean Δ KL"] = per.groupby("selector")["d_general_kl"].mean()
    table["mean rank"] = per.groupby("selector")["rank"].mean()
    table["domains"] = per.groupby("selector")["domain"].nunique()
    table = table.sort_values(["mean rank", "mean Δ bpb"])
    complete = [s for s in table.index[table["domains"] == len(domains)] if is_ablation(s)]
    return table, (str(complete[0]) if complete else None), default


DECISION_METRICS = ("domain_bpb", "general_kl")  # learn more, forget less: both lower is better


def default_decision(
    df,
    items: list[dict] | None,
    n_boot: int = 2000,
    default: str | None = None,
    summary: tuple | None = None,
):
    """Should the ``grads`` default change to Table 2's winner? The winner (:func:`ablation_summary`)
    paired against the default cell directly, per domain, at 5 %, on the seeds both ran and the
    items both evaluated, for the headline domain and forgetting metrics.

    The rule (fixed before medical's and legal's Table 2 ran; printed with the verdict): change
    only if the winner is significantly better on held-out domain bpb in at least one domain and
    significantly worse on neither headline metric in any domain with ablation runs. Returns
    ``(rows, verdict)``: one row per domain (``domain``, ``seeds``, a :class:`Paired` per metric)
    and one of ``"change"``, ``"keep"``, ``"default"`` (the winner is the default) or ``None`` (no
    winner or no items). ``summary``: :func:`ablation_summary`'s result, when already computed."""
    _, winner, default = summary or ablation_summary(df, default=default)
    if not winner:
        return [], None
    if winner == default:
        return [], "default"
    if not items:
        return [], None
    by_job = {str(r["job"]): r["items"] for r in items}
    runs = _ablation_runs(df)
    runs = runs[runs["selector"].isin([winner, default])]
    rows = [{**r, "items": by_job.get(str(r.get("job")))} for r in runs.to_dict("records")]
    raw: dict = {}
    paired_tables(rows, default, list(DECISION_METRICS), n_boot=n_boot, raw=raw)
    out = []  # every domain with 5 % runs: one without Table 2 leaves the decision open
    for domain in sorted(set(df.loc[df["budget"] == ABLATION_BUDGET, "domain"])):
        cells = {m: raw.get((domain, ABLATION_BUDGET, winner, m)) for m in DECISION_METRICS}
        seeds = next((p.n_seeds for p in cells.values() if p is not None), 0)
        out.append({"domain": domain, "seeds": seeds, **cells})
    bpb = [r["domain_bpb"] for r in out]
    if any(p is None for p in bpb):  # a domain without a paired comparison: not decided
        return out, None
    better = any(p.hi < 0 for p in bpb)
    worse = any(r[m] is not None and r[m].lo > 0 for r in out for m in DECISION_METRICS)
    return out, ("change" if better and not worse else "keep")


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
        cells = [_paired_cell(m, r[m]) for m in DECISION_METRICS]
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
        for budget in sorted({b for b, _ in wide.columns}, key=lambda b: _BUDGET_ORDER.get(b, 999)):
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


def _latex(wide) -> str:
    """LaTeX of a table whose cells may carry ▲ / ▼ (amssymb triangles) and ``_`` in names."""

    def tex(x: object) -> str:
        t = str(x).replace("_", r"\_").replace("±", r"$\pm$").replace("‖", r"$\|$")
        return t.replace("▲", r"$\blacktriangle$").replace("▼", r"$\blacktriangledown$")

    body = wide.copy()
    body.index = [tex(i) for i in body.index]
    body.columns = body.columns.set_levels([[tex(c) for c in lv] for lv in body.columns.levels])
    return body.map(tex).to_latex(escape=False)


# --------------------------------------------------------------------------------------------------
# Noise floor
# --------------------------------------------------------------------------------------------------
# In order of preference on a tie (ratios within 1 %): bits per byte first, since it does not
# depend on the tokenizer and so compares across model families.
DOMAIN_METRICS = ["domain_bpb", "domain_loss", "domain_acc"]
FORGETTING_METRICS = [
    "general_kl",
    "ref_nll",
    "ref_bpb",
    "text_bpb",
    "general_acc",
    "general_acc_norm",
]


def noise_floor_report(rows: list[dict], k_compare: int = 3) -> tuple[str, dict]:
    """Noise-floor table (Markdown) and numbers from the runs of ONE method on one domain.

    Each row must carry ``items`` (``collect(..., keep_items=True)``); the base model's items come
    with every run. Returns ``(markdown, {"metrics": {name: numbers}, "headline": {...}})``; the
    headline domain / forgetting metric is the one whose fine-tuning effect is largest relative to
    its minimum detectable difference (see :mod:`grads.evaluation.stats`); within 1 % of the best
    ratio, the earlier metric of :data:`DOMAIN_METRICS` / :data:`FORGETTING_METRICS` wins.
    """
    from grads.evaluation.stats import noise_floor

    rows = [r for r in rows if r.get("items")]
    if not rows:
        raise ValueError("no run with per-item results")
    methods = {(r["domain"], r["selector"], r["budget"]) for r in rows}
    if len(methods) != 1:
        raise ValueError(f"noise floor needs the runs of one method on one domain, got {methods}")
    domain, selector, budget = methods.pop()
    rows = sorted(rows, key=lambda r: r["seed"])
    table = {}
    for name in DOMAIN_METRICS + FORGETTING_METRICS:
        part = ITEM_METRICS[name].part
        runs = [r["items"]["tuned"].get(part) for r in rows]
        base = (rows[0]["items"].get("base") or {}).get(part)
        if not all(runs):
            continue
        nf = noise_floor(runs, base, name, k_compare=k_compare)
        if nf is not None:
            table[name] = nf
    head = {}
    for kind, names in (("domain", DOMAIN_METRICS), ("forgetting", FORGETTING_METRICS)):
        ratios = {m: table[m]["ratio"] for m in names if m in table}
        best = max(ratios.values(), default=None)
        head[kind] = next((m for m, r in ratios.items() if r >= 0.99 * best), None)
    lines = [
        f"Noise floor: {domain}, {selector} at {budget}, seeds {[r['seed'] for r in rows]} "
        f"vs the base model; MDD for two methods with {k_compare} seeds each (80 % power, "
        "alpha 0.05). Accuracies in points.\n",
        "| metric | base | tuned (mean) | effect | sd over seeds | CI half-width (vs base) "
        "| MDD | effect / MDD | items |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, nf in table.items():
        sc, dg = (100.0, 2) if ITEM_METRICS[name].num in ("acc", "acc_norm") else (1.0, 4)
        star = " **(headline)**" if name in head.values() else ""
        lines.append(
            f"| {name}{star} | {nf['base'] * sc:.{dg}f} | {nf['mean'] * sc:.{dg}f} "
            f"| {nf['effect'] * sc:+.{dg}f} | {nf['sd_seed'] * sc:.{dg}f} "
            f"| {nf['ci_half_width'] * sc:.{dg}f} | {nf['mdd'] * sc:.{dg}f} "
            f"| {nf['ratio']:.1f} | {nf['n_items']} |"
        )
    return "\n".join(lines) + "\n", {"metrics": table, "headline": head}


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


def cost_model(df):
    """Minutes per stage and domain: the median over runs of the seconds of the job that computed
    the stage (a cache hit carries them), so one job that shared the machine with other work does
    not set the estimate (one did on financial: a 50 % fine-tune at 19 min beside 11-12).

    Columns: the warm-up epoch, the gradient-norm pass, the IFD pass and the baselines' passes
    (the rest of the features stage), a fine-tune per budget (``full`` = the whole pool), one
    evaluation, and the GrADS selection cost (warm-up + gradient-norm pass) over the full fine-tune.
    Empty when the runs predate the per-stage columns. The cheap-selection variants
    (:data:`CHEAP_VARIANTS`: a 5 % warm-up, norms recorded during the warm-up) are left out: their
    stages are not the protocol's (their selection cost is in the cost table).
    """
    import pandas as pd

    if "warmup_cached" not in df.columns:
        return pd.DataFrame()
    # their own warm-up and features are not the protocol's
    df = df[~df["selector"].isin(CHEAP_VARIANTS)]

    def minutes(frame, col) -> float | None:
        # One row per run (a computed row before a cache hit of the same run); a cache hit carries
        # the seconds of the job that computed the stage, so runs collected again still count.
        ids = [c for c in ("selector", "budget", "seed") if c in frame]
        runs = frame.sort_values(col.replace("_s", "_cached"), kind="stable")
        values = runs.drop_duplicates(ids)[col].dropna()
        return round(float(values.median()) / 60, 1) if len(values) else None

    rows = []
    for domain, d in df.groupby("domain"):
        # the protocol's one features table: its computing job's seconds (a cache hit carries them)
        feats = d.sort_values("features_cached", kind="stable")
        if "features_gradnorm_s" in d:
            feats = feats.dropna(subset=["features_gradnorm_s", "features_ifd_s"])
        row = {"domain": domain, "warm-up": minutes(d, "warmup_s")}
        if len(feats) and "features_gradnorm_s" in d:
            f = feats.iloc[0]
            grad, ifd = f["features_gradnorm_s"], f["features_ifd_s"]
            row["grad-norm pass"] = round(grad / 60, 1)
            row["IFD pass"] = round(ifd / 60, 1)
            row["baseline passes"] = round((f["features_s"] - grad - ifd) / 60, 1)
        tuned = d[d["selector"] != "full"]
        for budget in sorted(tuned["budget"].unique(), key=lambda b: _BUDGET_ORDER.get(b, 999)):
            row[f"fine-tune {budget}"] = minutes(tuned[tuned["budget"] == budget], "finetune_s")
        row["fine-tune full"] = minutes(d[d["selector"] == "full"], "finetune_s")
        row["evaluation"] = minutes(d, "evaluate_s")
        if row.get("fine-tune full") and row.get("warm-up") and "grad-norm pass" in row:
            sel = row["warm-up"] + row["grad-norm pass"]
            row["GrADS selection / full FT"] = round(sel / row["fine-tune full"], 2)
        rows.append(row)
    return pd.DataFrame(rows)


def headline_plot(ddf, domain: str, out_dir: Path) -> Path | None:
    """The headline metrics per method and budget: held-out domain bpb (learn more: down) against
    KL(base || tuned) (forget less: left), mean ± std over seeds; ``None`` without those columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not {"domain_bpb", "general_kl"} <= set(ddf.columns) or ddf["general_kl"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    cmap = plt.get_cmap("tab20")
    for i, (sel, g) in enumerate(ddf.groupby("selector", sort=True)):
        groups = [("all", _full_once(g))] if sel == "full" else list(g.groupby("budget"))
        for b, gb in groups:
            mb, sb, n = _mean_std(gb["domain_bpb"].tolist())
            mk, sk, _ = _mean_std(gb["general_kl"].tolist())
            if n == 0 or math.isnan(mb) or math.isnan(mk):
                continue
            ax.errorbar(mk, mb, xerr=sk, yerr=sb, fmt="o" if b != "p50" else "D",
                        color=cmap(i % 20), capsize=2, label=f"{sel} ({b}, n={n})")  # fmt: skip
    ax.set_xlabel("KL(base ‖ tuned) per token  →  forgets more")
    ax.set_ylabel("held-out domain bits per byte  ↓  learns more")
    ax.set_title(f"{domain}: the headline metrics (mean ± std over seeds)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    p = out_dir / f"bpb_vs_kl_{domain}.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def forest_plot(raw: dict, domain: str, out_dir: Path, reference: str = "random") -> Path | None:
    """The paired differences vs ``reference`` of the two headline metrics (held-out bpb, KL) with
    their 95 % CIs, one row per method and budget: what the paired table says, at a glance.
    Filled markers: the CI excludes 0. ``forest_<domain>.png``; ``None`` without comparisons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in PAIRED_METRICS[:2] if m in ITEM_METRICS]
    keys = sorted(
        {(b, sel) for (d, b, sel, m) in raw if d == domain and m in metrics},
        key=lambda k: (_BUDGET_ORDER.get(k[0], 999), k[1]),
    )
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.5, 0.28 * len(keys) + 1.4),
                             sharey=True, squeeze=False)  # fmt: skip
    colors = {"p5": "tab:blue", "p50": "tab:orange"}
    for ax, metric in zip(axes[0], metrics, strict=True):
        for y, (budget, sel) in enumerate(keys):
            p = raw.get((domain, budget, sel, metric))
            if p is None:
                continue
            c = colors.get(budget, "tab:gray")
            ax.errorbar(p.mean, y, xerr=[[p.mean - p.lo], [p.hi - p.mean]], fmt="o", color=c,
                        mfc=c if p.significant else "white", capsize=2, ms=4)  # fmt: skip
        ax.axvline(0.0, color="black", lw=0.8)
        better = "→ better" if ITEM_METRICS[metric].higher_is_better else "← better"
        ax.set_xlabel(f"{ITEM_METRICS[metric].label} − {reference}  ({better})")
        ax.grid(axis="x", lw=0.3)
    axes[0][0].set_yticks(range(len(keys)), [f"{sel} ({b})" for b, sel in keys], fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(
        f"{domain}: paired difference vs {reference}, 95 % CI (filled: excludes 0)", fontsize=9
    )
    fig.tight_layout()
    path = out_dir / f"forest_{domain}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(df, out_dir: Path) -> list[Path]:
    """Headline metrics (bpb vs KL), domain gain vs forgetting per method, accuracy vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for domain, ddf in df.groupby("domain"):
        head = headline_plot(ddf, str(domain), out_dir)
        if head:
            paths.append(head)
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
            _markdown(wide),
            _best_other_note(wide),
            _short_subset_note(t1[t1["domain"] == domain]),
            "\n",
        ]
        tex += [f"% {domain}\n", _latex(wide), "\n"]
    if items:
        written["items"] = _write_items(out_dir / f"{title}_items.json.gz", items)
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
    model = cost_model(runs)
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

    by_job = {str(r["job"]): r["items"] for r in items}  # a CSV may read "0" back as 0
    both = pd.concat([t1, df[df["selector"].map(is_ablation)]], ignore_index=True)
    rows = [{**r, "items": by_job.get(str(r.get("job")))} for r in both.to_dict("records")]
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
            _markdown(wide),
            "\n",
        ]
        tex += [f"% {domain}: paired difference vs {reference}\n", _latex(wide), "\n"]
    # Table 2 (the headline domain and forgetting metrics): rule x gradient source grids
    for metric in [m for m in (metrics or PAIRED_METRICS) if m in ITEM_METRICS][:2]:
        label = ITEM_METRICS[metric].label
        for where, grid in ablation_tables(paired, label).items():
            md += [
                f"\n## {where}: ablation, {label} vs {reference} (rule x gradient source)\n",
                "Rows: the `grads` selection rule; columns: the gradient norms in the signal "
                "(input embedding, LM head, both). Cells as in the paired table.\n\n",
                _markdown(grid),
                "\n",
            ]
            tex += [f"% {where}: ablation, {label}\n", _latex(grid), "\n"]
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
        _markdown(shown),
        "\n",
        verdict,
    ]
    tex = ["% ablation across domains\n", _latex(shown), "\n"]
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


def _write_items(path: Path, items: list[dict]) -> Path:
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


def _read_items(path: Path) -> list[dict] | None:
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
        its = _read_items(path.with_name(f"{path.stem}_items.json.gz"))
        if len(runs) > 1:
            df["job"] = [f"{path.stem}/{j}" for j in df["job"]]
            its = [{**it, "job": f"{path.stem}/{it['job']}"} for it in its or []]
        any_items |= its is not None
        frames.append(df)
        items += its or []
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return df, (items if any_items else None)


def _markdown(wide) -> str:
    cols = [f"{b} {m}".strip() for b, m in wide.columns]
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_csv:
        df, items = read_csvs([Path(p) for p in args.from_csv])
        out = Path(args.out or Path(args.from_csv[0]).parent)
    else:
        if not args.sweep_dir:
            ap.error("give a sweep folder or --from-csv")
        rows, missing = [], []
        for d in args.sweep_dir:
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
