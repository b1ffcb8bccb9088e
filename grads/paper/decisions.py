"""The decision rules of the paper's protocol, each fixed before the runs it reads.

* :func:`strongest_baselines`: the baselines ranked by held-out domain bpb at 5 %, seed 0 (the two
  best get seeds 1 and 2, the best a 50 % run).
* :func:`best_ablation_cell`: the Table 2 cell other than the default with the lowest bpb at seed 0
  (it gets seeds 1 and 2).
* :func:`ablation_summary` / :func:`grid_leader`: Table 2 across domains, ranked by the mean rank of
  each cell's bpb difference to ``random``; the leader gets seeds 1 and 2 in every domain.
* :func:`default_decision`: whether the leader replaces the ``grads`` default, from their paired
  comparison.
* :func:`default_at_p50`: whether a changed default needs its own 50 % run.
"""

from __future__ import annotations

from pathlib import Path

from grads.paper.frames import ablation_runs, as_current_default, collect, with_default_cell
from grads.paper.protocol import (
    ABLATION_BUDGET,
    GRADS_VARIANTS,
    HEADLINE,
    ablation_sources,
    baselines,
    default_grads_run,
    domains,
    is_ablation,
    rules,
)
from grads.report.collect import read_csvs
from grads.report.paired import paired_tables


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
    abl = ablation_runs(df)
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
    over = sorted(per["domain"].unique())
    table = per.pivot(index="selector", columns="domain", values="d_domain_bpb")[over]
    table.columns = [f"Δ bpb {d}" for d in over]
    table["mean Δ bpb"] = per.groupby("selector")["d_domain_bpb"].mean()
    if "general_kl" in cols:
        table["mean Δ KL"] = per.groupby("selector")["d_general_kl"].mean()
    table["mean rank"] = per.groupby("selector")["rank"].mean()
    table["domains"] = per.groupby("selector")["domain"].nunique()
    table = table.sort_values(["mean rank", "mean Δ bpb"])
    complete = [s for s in table.index[table["domains"] == len(over)] if is_ablation(s)]
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
    runs = ablation_runs(df)
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


def strongest_baselines(runs_dir: Path) -> dict:
    """Rank the baselines of ``main_p5`` by the headline domain metric (needs every one finished)."""
    rows, _ = collect(runs_dir / "main_p5")
    names = baselines()
    scores = {
        r["selector"]: r[HEADLINE]
        for r in rows
        if r["selector"] in names and r.get(HEADLINE) is not None
    }
    missing = sorted(set(names) - set(scores))
    if missing:
        raise SystemExit(
            f"main_p5 has no {HEADLINE} for {missing} under {runs_dir / 'main_p5'}: "
            "run (or finish) that phase first"
        )
    ranked = sorted(scores, key=scores.get)
    return {"metric": HEADLINE, "scores": scores, "strongest": ranked}


def best_ablation_cell(runs_dir: Path) -> dict:
    """The Table 2 cell other than the default with the lowest headline metric at seed 0 (needs the
    whole grid of this domain's ablation sweeps): the one ``ablation_seeds`` runs on seeds 1 and 2."""
    sweeps = ablation_sources()
    rows = [r for ph in sweeps if (runs_dir / ph).is_dir() for r in collect(runs_dir / ph)[0]]
    scores = {
        r["selector"]: r[HEADLINE]
        for r in rows
        if is_ablation(r["selector"]) and r["seed"] == 0 and r.get(HEADLINE) is not None
    }
    scores.pop(default_grads_run(), None)  # main_p5's `grads`: seeds_p5 ran it on 3 seeds
    want = len(sweeps) * len(rules()) - 1
    if len(scores) < want:
        raise SystemExit(
            f"the ablation under {runs_dir} has {HEADLINE} for {len(scores)} of its {want} cells: "
            "run (or finish) the ablation phase first"
        )
    best = min(scores, key=scores.get)
    _, rule, source = best.split(".")
    return {"ablation_scores": scores, "best_cell": best, "rule": rule, "layers": source.split("+")}


def grid_leader(domain: str, runs_dir: Path, tables_dir: Path) -> dict:
    """The Table 2 cell that leads across domains (:func:`ablation_summary`'s winner
    over this domain's runs and the collected CSVs ``<tables_dir>/<other>/<other>.csv`` of the
    other domains): the cell the default decision pairs with the default. ``leader_seeds`` are the
    seeds of 1 and 2 it has not run in this domain (empty when it is the default, which
    ``seeds_p5`` ran, or when ``ablation_seeds`` already ran it). Needs this domain's grid."""
    import pandas as pd

    best_ablation_cell(runs_dir)  # raises while this domain's grid is incomplete
    here = pd.DataFrame(collect(runs_dir)[0])
    others = [p for d in domains() if d != domain and (p := tables_dir / d / f"{d}.csv").is_file()]
    frames = [here, read_csvs(others)[0]] if others else [here]
    df = with_default_cell(as_current_default(pd.concat(frames, ignore_index=True)))
    table, leader, default = ablation_summary(df)
    if leader is None:
        raise SystemExit(f"no Table 2 cell is present in every domain of {tables_dir} and {domain}")
    ran = set(here.loc[here["selector"] == leader, "seed"].astype(int))
    missing = [] if leader == default_grads_run() else sorted({1, 2} - ran)
    _, rule, source = leader.split(".")
    over = [c.removeprefix("Δ bpb ") for c in table.columns if c.startswith("Δ bpb ")]
    return {
        "leader": leader,
        "leader_rule": rule,
        "leader_layers": source.split("+"),
        "leader_seeds": missing,
        "leader_over": over,
    }


def default_at_p50(runs_dir: Path) -> dict:
    """``default_p50``: when the ``grads`` default (``conf/selector/grads.yaml``) changed after
    ``main_p50`` ran the old one, the new default at 50 % (seed 0), in a folder of its own so the old
    default's run stays (it becomes its Table 2 cell's 50 % row). Nothing while ``main_p50`` has not
    run ``grads`` (it will run the current default) or once the current default has a 50 % run."""
    default = default_grads_run()
    rows = [r for r in collect(runs_dir)[0] if r["budget"] == "p50" and r.get("grads_cell")]
    ran = {r["grads_cell"] for r in rows}
    todo = [0] if ran and default not in ran else []
    return {"default_cell": default, "default_p50": todo}
