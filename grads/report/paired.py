"""Paired comparisons against a reference method, with bootstrap CIs over items and seeds.

For every method against a reference method (default ``random``) at the same budget and seeds, the
mean paired difference of each metric in :data:`PAIRED_METRICS` and its bootstrap 95 % CI over items
and seeds (:func:`grads.evaluation.stats.paired_bootstrap`); ▲ marks a significant win, ▼ a
significant loss.
"""

from __future__ import annotations

from grads.evaluation.metrics import ITEM_METRICS
from grads.report.tables import budget_key

# The paired-comparison columns: the headline domain and forgetting metrics chosen by the measured
# noise floor (RESULTS.md, "Noise floor"), then the accuracies users expect beside them.
PAIRED_METRICS = ["domain_bpb", "general_kl", "domain_acc", "general_acc"]


def item_part(row: dict, metric: str) -> dict | None:
    """The tuned model's per-item results of the evaluation part ``metric`` is computed on."""
    part = ITEM_METRICS[metric].part
    return ((row.get("items") or {}).get("tuned") or {}).get(part)


def paired_cell(metric: str, p) -> str:
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


def _groups(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """``(domain, model, trainer mode, budget) -> selector -> seed -> row`` of the rows with items;
    ``full``, which ignores the budget (one run, as in :func:`grads.report.tables.paper_tables`),
    under every budget, not only the one its sweep job was launched under."""
    groups: dict[tuple, dict[str, dict]] = {}
    full: dict[tuple, dict] = {}
    for r in rows:
        if not r.get("items"):
            continue
        key = (r["domain"], r.get("model"), r.get("trainer_mode"), r["budget"])
        groups.setdefault(key, {}).setdefault(r["selector"], {})[r["seed"]] = r
        if r["selector"] == "full":
            full.setdefault(key[:3], {}).setdefault(r["seed"], r)
    for key, by_sel in groups.items():
        if key[:3] in full:
            by_sel.setdefault("full", full[key[:3]])
    return groups


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
    (for :func:`grads.report.plots.forest_plot`).
    """
    import pandas as pd

    from grads.evaluation.stats import paired_bootstrap

    metrics = [m for m in (metrics or PAIRED_METRICS) if m in ITEM_METRICS]
    out: dict[str, dict] = {}
    for (domain, _, _, budget), by_sel in sorted(_groups(rows).items(), key=lambda kv: str(kv[0])):
        ref = by_sel.get(reference)
        if not ref:
            continue
        table = out.setdefault(domain, {})
        for sel, by_seed in by_sel.items():
            seeds = sorted(set(by_seed) & set(ref))
            for metric in metrics:
                cell = "ref" if sel == reference else "–"
                a = [item_part(by_seed[s], metric) for s in seeds]
                b = [item_part(ref[s], metric) for s in seeds]
                if sel != reference and seeds and all(a) and all(b):
                    p = paired_bootstrap(a, b, metric, n_boot=n_boot)
                    cell = paired_cell(metric, p)
                    if raw is not None:
                        raw[(domain, budget, sel, metric)] = p
                table.setdefault(sel, {})[(budget, ITEM_METRICS[metric].label)] = cell
    tables = {}
    for domain, table in out.items():
        wide = pd.DataFrame.from_dict(table, orient="index")
        budgets = sorted({b for b, _ in wide.columns}, key=budget_key)
        cols = [(b, ITEM_METRICS[m].label) for b in budgets for m in metrics]
        wide = wide.reindex(columns=[c for c in cols if c in wide.columns]).fillna("–")
        wide.columns = pd.MultiIndex.from_tuples(wide.columns)
        order = [s for s in (reference, "full", "grads") if s in wide.index]
        tables[domain] = wide.loc[order + sorted(s for s in wide.index if s not in order)]
    return tables
