"""Which runs make which table: the runs as collected, named under the current ``grads`` default.

A ``grads`` run records the Table 2 cell it selected with (``grads_cell``, from its resolved config).
When the default changes, :func:`as_current_default` names the earlier default's runs by their cell
and lets the new default's cell stand in for Table 1's ``grads`` row; :func:`with_default_cell` puts
Table 1's ``grads`` run into Table 2 as the default's cell (the same selection, trained once);
:func:`table1_frame` keeps Table 2 out of Table 1 but for the best other rule of each domain.
"""

from __future__ import annotations

from pathlib import Path

from grads.paper.protocol import (
    ABLATION_BUDGET,
    BEST_OTHER,
    default_grads_run,
    grads_cell,
    is_ablation,
)
from grads.report.collect import collect as collect_rows


def collect(sweep_dir: str | Path, keep_items: bool = False) -> tuple[list[dict], list[str]]:
    """:func:`grads.report.collect.collect` with the Table 2 cell of every ``grads`` and ablation
    run (``grads_cell``; ``None`` for the others)."""
    rows, missing = collect_rows(sweep_dir, keep_items)
    for row in rows:
        config = Path(sweep_dir) / row["job"] / "config_resolved.yaml"
        row["grads_cell"] = grads_cell(config, row["selector"])
    return rows, missing


def ablation_runs(df):
    """The Table 2 runs (``grads.<rule>.<source>`` at 5 %)."""
    return df[df["selector"].map(is_ablation) & (df["budget"] == ABLATION_BUDGET)]


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
    abl = ablation_runs(df)
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
    abl = ablation_runs(df)
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
    main = df.drop(ablation_runs(df).index)  # at 50 %, an earlier default's grads runs stay
    extra = [
        df[(df["domain"] == d) & (df["selector"] == name)].assign(selector=name + BEST_OTHER)
        for d, name in best.items()
    ]
    return pd.concat([main, *extra], ignore_index=True) if extra else main.reset_index(drop=True)
