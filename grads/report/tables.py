"""Mean ± std tables over seeds and their Markdown / LaTeX.

Layout (as in the GrADS paper): one table per domain, rows = methods (selectors), and for each budget
the columns domain accuracy, general accuracy and forgetting, as ``mean ± std`` over seeds, plus the
continuous metrics of the evaluation when the runs have them (held-out domain loss, KL to the base).
"""

from __future__ import annotations

import math

# Continuous columns of the main table (mean ± std over seeds, raw units) when the runs have them.
CONTINUOUS_COLS = [("domain_bpb", "Domain bpb"), ("general_kl", "KL")]
_BUDGET_ORDER = {"p5": 5, "p10": 10, "p25": 25, "p50": 50, "p100": 100, "auto": 1000}


def budget_key(budget: object) -> int:
    """Sort key of a budget name: the fractions in increasing order, ``auto`` and others last."""
    return _BUDGET_ORDER.get(budget, 999)


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation and count of the values that are not missing."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def fmt_mean_std(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` scaled (points by default); the mean alone for one value, ``–`` for none."""
    if n == 0:
        return "–"
    m, sd = mean * scale, std * scale
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def full_once(df):
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
        budgets = sorted(ddf["budget"].dropna().unique(), key=budget_key)
        table = {}
        for sel, sdf in ddf.groupby("selector", sort=False):
            row = {}
            for b in budgets:
                bdf = sdf[sdf["budget"] == b] if sel != "full" else full_once(sdf)
                for col, label, scale, digits in metrics:
                    row[(b, label)] = fmt_mean_std(*mean_std(bdf[col].tolist()), scale, digits)
                row[(b, "n")] = str(len(bdf)) if len(bdf) else "–"
            table[sel] = row
        wide = pd.DataFrame.from_dict(table, orient="index")
        wide.columns = pd.MultiIndex.from_tuples(wide.columns)
        order = [s for s in ("full", "random", "grads") if s in wide.index]
        wide = wide.loc[order + sorted(s for s in wide.index if s not in order)]
        out[domain] = wide
    return out


def markdown(wide) -> str:
    """A Markdown table of a frame with two-level columns (``"<budget> <metric>"`` headers)."""
    cols = [f"{b} {m}".strip() for b, m in wide.columns]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for idx, row in wide.iterrows():
        lines.append(f"| {idx} | " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def latex(wide) -> str:
    """LaTeX of a table whose cells may carry ▲ / ▼ (amssymb triangles) and ``_`` in names."""

    def tex(x: object) -> str:
        t = str(x).replace("_", r"\_").replace("±", r"$\pm$").replace("‖", r"$\|$")
        return t.replace("▲", r"$\blacktriangle$").replace("▼", r"$\blacktriangledown$")

    body = wide.copy()
    body.index = [tex(i) for i in body.index]
    body.columns = body.columns.set_levels([[tex(c) for c in lv] for lv in body.columns.levels])
    return body.map(tex).to_latex(escape=False)
