"""Run the real-domain tables (RESULTS.md, "Real-domain tables") for one domain, phase by phase.

Phases, in the order the compute is spent (each is one ``grads -m`` sweep; the warm-up and features
of the domain are computed once, by the first job, and shared by every later job through the cache):

* ``main_p5``   Table 1 at 5 %, seed 0: every selector of ``experiment=paper_main`` (``full`` included).
* ``seeds_p5``  seeds 1 and 2 at 5 % for ``random``, ``grads``, ``grads_paper`` and the two strongest
                baselines.
* ``main_p50``  Table 1 at 50 %, seed 0: ``random``, ``grads``, ``grads_paper`` and the strongest
                baseline.
* ``ablation``  Table 2: ``experiment=paper_ablation`` (GrADS rule x gradient source) at 5 %, seed 0,
                as one sweep per source; the default rule with both sources is main_p5's ``grads``
                run (the same selection), not trained again.
* ``ablation_seeds``  seeds 1 and 2 for the best Table 2 cell other than the default (lowest held-out
                bpb at seed 0), so the rule that may replace the default does not rest on one seed
                (the default with both sources is ``grads``, which ``seeds_p5`` already ran on 3 seeds).
* ``leader_seeds``  seeds 1 and 2 for the Table 2 cell that leads across domains (mean rank over
                this domain's grid and the collected CSVs of the other domains beside
                ``<results>``): the cell the default decision pairs with the default
                (``grads.report.default_decision``), so that it rests on 3 seeds in every domain.
                Only the seeds it lacks here; rerun once more domains are in (a new leader gets its
                own folder under ``leader_seeds/``).
* ``default_p50``  the ``grads`` default at 50 % again, when it changed (Table 2's decision) after
                ``main_p50`` ran the old one; nothing otherwise.
* ``balanced``  on a label-like pool (legal's Yes/No answers): ``select.balance=answer`` at 5 %,
                seed 0, for ``random``, ``grads``, ``grads_paper`` and the loss/norm/IFD baselines
                (each answer gets its pool share of the budget, filled in the selector's order;
                :mod:`grads.selectors.balance`, an option, not the paper's). Skipped elsewhere.
* ``seeds_p50``  (opt-in, not in the default ``--phases``: about 1–1.7 CPU-hours a domain) seeds 1
                and 2 at 50 % for ``random`` and ``grads``, so Table 1's 50 % comparison that
                matters rests on 3 seeds like the 5 % one; a folder per selector and seed.
* ``cheap``     the cheaper selection variants (RESULTS.md, "Cost of selection") end to end at 5 %,
                seed 0: ``grads_w5`` = GrADS on a warm-up of 5 % of the pool (``warmup.fraction=0.05``)
                + the features pass; ``grads_rec`` = the norms recorded during the full warm-up
                (``features.source=warmup``). Their rows say whether the cheap subsets train alike.

"Strongest baseline" = lowest held-out domain bits per byte (the headline domain metric, RESULTS.md
"Noise floor") at 5 %, seed 0, among the non-GrADS selectors (loss_high, gradnorm, ifd, length, less,
rds); the choice is written to ``<results>/plan.json`` before it is used, as is ``ablation_seeds``'s
cell.

After every phase the domain's runs are collected into ``results/tables/<domain>/`` (CSV, per-item
results for the paired CIs, tables, plots) and the selected ids of every run are copied to
``results/tables/<domain>/selections/`` (one small JSONL per method, budget and seed). Re-running
a phase after an interruption recomputes only what the stage cache lacks.

    python scripts/run_tables.py financial                       # every phase
    python scripts/run_tables.py financial --phases main_p5      # one phase
    python scripts/run_tables.py financial --dry-run             # print the commands
    python scripts/run_tables.py financial --status              # finished / planned jobs per phase
    python scripts/run_tables.py financial --collect-only        # re-collect what has finished
    python scripts/run_tables.py financial --views-only          # subset views from results/ only
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from grads.constants import REPO_ROOT
from grads.io import read_json, read_jsonl, write_json, write_jsonl, write_text

DOMAINS = ["medical", "legal", "financial"]
BASELINES = ["loss_high", "gradnorm", "ifd", "length", "less", "rds"]
# random and grads first (the comparison that matters arrives early), full (3 epochs of the pool) last
MAIN_SELECTORS = ["random", "grads", "grads_paper", "grads_cover", *BASELINES, "full"]
PHASES = [
    "main_p5",
    "seeds_p5",
    "main_p50",
    "ablation",
    "ablation_seeds",
    "leader_seeds",
    "default_p50",
    "cheap",
    "balanced",
]
# more compute, asked for by name (--phases seeds_p50): not part of the 12-hour protocol
EXTRA_PHASES = ["seeds_p50"]
ALL_PHASES = PHASES + EXTRA_PHASES
# phases whose jobs depend on what has run (plan[phase]: the seeds still to run; empty: skipped)
TOP_UP = ("leader_seeds", "default_p50")
# selector name -> what differs from the paper's selection (a separate sweep each). Their features
# are GrADS's alone (no IFD / LESS / RDS+ passes), so their selection cost is what a user pays.
_GRADS_ONLY = ["features.ifd=false", "features.representations=[]"]
CHEAP = {
    "grads_w5": ["warmup.fraction=0.05", *_GRADS_ONLY],
    "grads_rec": ["features.source=warmup", *_GRADS_ONLY],
}
# the balanced phase: the selectors whose legal subsets were one class, and their references
BALANCED = ["random", "grads", "grads_paper", "loss_high", "gradnorm", "ifd"]
# Table 2 as three sweeps, one per gradient source: the default's cell (conf/selector/grads.yaml's
# rule and layers) is the `grads` run of main_p5 (same selection; grads.report.with_default_cell
# puts it in the grid), so it is not trained again. The rules swept by conf/experiment/paper_ablation.yaml:
RULES = ["density", "magnitude", "density_x_magnitude", "stratified", "adaptive"]
ABLATION = {
    "ablation_embed": "embed",
    "ablation_lm_head": "lm_head",
    "ablation_both": "embed+lm_head",
}


def ablation_overrides(phase: str, default: str | None = None) -> list[str]:
    """One source's sweep of Table 2: every rule but the default's, when this is its source."""
    from grads.report import default_grads_run

    _, d_rule, d_source = (default or default_grads_run()).split(".")
    source = ABLATION[phase]
    rules = [r for r in RULES if (r, source) != (d_rule, d_source)]
    return [f"selector.layers=[{source.replace('+', ',')}]", f"selector.rule={','.join(rules)}"]


SUBPHASES = {"ablation": ABLATION, "cheap": CHEAP}
HEADLINE = "domain_bpb"  # lower is better


def expand_phases(phases: list[str]) -> list[str]:
    """The sweeps of ``phases`` in order (``ablation`` and ``cheap`` are one sweep per part)."""
    return [p for ph in phases for p in SUBPHASES.get(ph, [ph])]


def phase_overrides(phase: str, plan: dict) -> list[str]:
    """The ``grads -m`` overrides of one phase (``plan``: the strongest baselines, when needed)."""
    if phase == "main_p5":
        return [
            "experiment=paper_main",
            "budget=p5",
            "seed=0",
            f"selector={','.join(MAIN_SELECTORS)}",
        ]
    if phase == "seeds_p5":
        # + grads_paper: the paper-faithful GrADS variant gets the seeds the default rule gets
        sels = ["random", "grads", "grads_paper", *plan["strongest"][:2]]
        return ["experiment=paper_main", "budget=p5", "seed=1,2", f"selector={','.join(sels)}"]
    if phase == "main_p50":  # + grads_paper, as at 5 %
        sels = ["random", "grads", "grads_paper", plan["strongest"][0]]
        return ["experiment=paper_main", "budget=p50", "seed=0", f"selector={','.join(sels)}"]
    if phase in ABLATION:
        return ["experiment=paper_ablation", *ablation_overrides(phase)]
    if phase == "ablation_seeds":
        return [
            "experiment=paper_ablation",
            f"selector.layers=[{','.join(plan['layers'])}]",
            f"selector.rule={plan['rule']}",
            "seed=1,2",
        ]
    if phase == "seeds_p50":
        return [
            "experiment=paper_main",
            "budget=p50",
            "seed=1,2",
            "selector=random,grads",
            "hydra.sweep.subdir=${selector.name}_seed${seed}",
        ]
    if phase == "default_p50":  # the grads default, changed since main_p50 ran it
        return ["experiment=paper_main", "budget=p50", "seed=0", "selector=grads"]
    if phase == "leader_seeds":  # only the seeds the leader lacks in this domain (plan)
        return [
            "experiment=paper_ablation",
            f"selector.layers=[{','.join(plan['leader_layers'])}]",
            f"selector.rule={plan['leader_rule']}",
            f"seed={','.join(map(str, plan['leader_seeds']))}",
            # a job folder per seed, not per job number: a rerun that runs only the seeds still
            # missing (say [2] after seed 1 finished) must not write seed 2 into seed 1's folder 0
            "hydra.sweep.subdir=seed${seed}",
        ]
    if phase == "balanced":  # plan["balanced"]: the selectors, empty on a pool without labels
        return [
            "experiment=paper_main",
            "budget=p5",
            "seed=0",
            "select.balance=answer",
            f"selector={','.join(plan['balanced'])}",
            "hydra.sweep.subdir=${selector.name}",  # a rerun with another list overwrites nothing
        ]
    if phase in CHEAP:
        return [
            "experiment=paper_main",
            "budget=p5",
            "seed=0",
            "selector=grads",
            f"selector.name={phase}",
            *CHEAP[phase],
        ]
    raise ValueError(f"unknown phase {phase!r}; choose from {ALL_PHASES}")


def strongest_baselines(runs_dir: Path) -> dict:
    """Rank the baselines of ``main_p5`` by the headline domain metric (needs every one finished)."""
    from grads.report import collect

    rows, _ = collect(runs_dir / "main_p5")
    scores = {
        r["selector"]: r[HEADLINE]
        for r in rows
        if r["selector"] in BASELINES and r.get(HEADLINE) is not None
    }
    missing = sorted(set(BASELINES) - set(scores))
    if missing:
        raise SystemExit(
            f"main_p5 has no {HEADLINE} for {missing} under {runs_dir / 'main_p5'}: "
            "run (or finish) that phase first"
        )
    ranked = sorted(scores, key=scores.get)
    return {"metric": HEADLINE, "scores": scores, "strongest": ranked}


def collect_domain(domain: str, runs_dir: Path, results_dir: Path) -> None:
    """Tables + per-item results + selected ids of every finished run of the domain."""
    from grads.report import main as report_main

    if not any(runs_dir.rglob("metrics.json")):
        print(f"nothing to collect under {runs_dir}")
        return
    report_main([str(runs_dir), "--out", str(results_dir), "--title", domain])
    if update_results_md(REPO_ROOT / "RESULTS.md", domain, results_dir):
        print(f"RESULTS.md: tables of {domain} updated")
    sources = publish_selections(runs_dir, results_dir / "selections")
    if sources:
        publish_pool_features(runs_dir, results_dir / "pool_features.csv", sources)
        selection_views(domain, results_dir, sources)
    merge_domains(results_dir.parent)


def selection_views(domain: str, results_dir: Path, sources: dict[str, str] | None = None) -> None:
    """What the subsets are made of (sources, overlap, profile): from the committed selections and
    ``pool_features.csv`` alone (``--views-only``), so they regenerate without the runs."""

    sel_dir, pool_csv = results_dir / "selections", results_dir / "pool_features.csv"
    if sources is None:
        if not pool_csv.is_file():
            raise SystemExit(f"{pool_csv} is missing: collect the domain's runs first")
        pool = read_pool_features(pool_csv)
        sources = dict(zip(pool["id"], pool["source"], strict=True))
    source_composition(sel_dir, sources, results_dir, domain)
    selection_overlap(sel_dir, len(sources), results_dir, domain)
    if pool_csv.is_file():
        subset_profile(sel_dir, pool_csv, results_dir, domain)
        selection_map(sel_dir, pool_csv, results_dir, domain)


def merge_domains(tables_dir: Path, results_md: Path = REPO_ROOT / "RESULTS.md") -> None:
    """Merge the committed per-domain CSVs (``<tables_dir>/<domain>/<domain>.csv``) into
    ``<tables_dir>/../tables_all/`` and put its cross-domain part (Table 2 across domains and the
    winner paired with the default rule, which decide the default) in RESULTS.md between ``<!-- tables:all:begin -->`` and ``<!-- tables:all:end -->``."""
    from grads.report import main as report_main

    csvs = sorted(p for d in DOMAINS if (p := tables_dir / d / f"{d}.csv").is_file())
    if not csvs:
        return
    out = tables_dir.parent / "tables_all"  # outside tables/, so tables/*/*.csv stays the domains
    report_main(["--from-csv", *map(str, csvs), "--out", str(out), "--title", "all"])
    md = (out / "all.md").read_text()
    text = "\n".join(  # the grid across domains, then the winner paired with the default
        f"## {head}" + part[1].split("\n## ", 1)[0]
        for head in ("ablation across domains", "the default rule")
        if len(part := md.split(f"\n## {head}", 1)) > 1
    )
    if update_results_md(results_md, "all", out, text or "No ablation runs yet.\n"):
        print("RESULTS.md: tables across domains updated")


def publish_selections(runs_dir: Path, sel_dir: Path) -> dict[str, str]:
    """Copy every run's ``selection.jsonl`` (id, rank, score) with each id's source to ``sel_dir``
    as ``<selector>_<budget>_seed<k>.jsonl``; returns ``{id: source}`` of the pool."""
    sel_dir.mkdir(parents=True, exist_ok=True)
    sources: dict[str, str] = {}
    for mfile in sorted(runs_dir.rglob("metrics.json")):
        m = read_json(mfile)
        src = Path(m.get("artefacts", {}).get("select", "")) / "selection.jsonl"
        if not src.is_file():
            continue
        if not sources:  # the pool is the same for every run of the domain
            sources = pool_sources(mfile.parent / "config_resolved.yaml")
        rows = read_jsonl(src)
        name = f"{m['selector']}_{m['budget']}_seed{m['seed']}.jsonl"
        write_jsonl(sel_dir / name, [{**r, "source": sources.get(r["id"])} for r in rows])
    return sources


def source_composition(sel_dir: Path, sources: dict[str, str], out_dir: Path, domain: str) -> None:
    """What each method selected, by pool source (% of its subset; the pool itself first): a
    Markdown table and a stacked-bar plot, ``sources_<domain>.{md,png}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    counts = {"pool": pd.Series(list(sources.values())).value_counts()}
    for f in sorted(sel_dir.glob("*.jsonl")):
        counts[f.stem] = pd.Series([r["source"] for r in read_jsonl(f)]).value_counts()
    table = pd.DataFrame(counts).T.fillna(0)
    share = (100 * table.div(table.sum(axis=1), axis=0)).round(1)
    share["n"] = table.sum(axis=1).astype(int)
    write_text(out_dir / f"sources_{domain}.md", share.to_markdown() + "\n")
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(share) + 1.2))
    share.drop(columns="n").iloc[::-1].plot.barh(stacked=True, ax=ax, width=0.8)
    ax.set_xlabel("% of the selected subset")
    ax.set_title(f"{domain}: what each method selected, by pool source")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"sources_{domain}.png", dpi=110)
    plt.close(fig)


def selected_subsets(sel_dir: Path, budget: str, seed: int) -> dict[str, set[str]]:
    """The published subsets at ``budget`` and ``seed`` (``<method>_<budget>_seed<k>.jsonl``),
    method -> ids, ``full`` left out (it is the pool)."""
    suffix = f"_{budget}_seed{seed}"
    return {
        f.name[: -len(suffix) - len(".jsonl")]: {r["id"] for r in read_jsonl(f)}
        for f in sorted(sel_dir.glob(f"*{suffix}.jsonl"))
        if not f.name.startswith("full_")
    }


PROFILE = {  # column of the features table -> how a subset is summarised in subset_profile
    "n_tokens": "median",  # supervised tokens
    "loss": "mean",  # the warm-up model's loss on the sample
    "embed": "median",  # ||dL/dE|| (input embedding)
    "lm_head": "median",  # ||dL/dW_head||
}


def read_pool_features(pool_csv: Path):
    """``pool_features.csv`` with id, source and answer as text, as written (an answer "None" or
    "NA" stays a label) and only the :data:`PROFILE` columns parsed as numbers."""
    import pandas as pd

    return pd.read_csv(
        pool_csv,
        dtype={"id": str, "source": str, "answer": str},
        keep_default_na=False,
        na_values={c: ["", "nan", "NaN"] for c in PROFILE},
    )


def publish_pool_features(runs_dir: Path, out_file: Path, sources: dict[str, str]) -> bool:
    """The domain's features table as the warm-up model sees the pool (``main_p5``'s, shared by
    every selector): id, source, the answer on a label-like pool (:func:`pool_answers`) and the
    :data:`PROFILE` columns, a small CSV beside the selections so the subset profiles regenerate
    without the cache. False if no main_p5 run has one."""
    import pandas as pd

    for mfile in sorted((runs_dir / "main_p5").rglob("metrics.json")):
        f = Path(read_json(mfile).get("artefacts", {}).get("features", "")) / "features.parquet"
        if f.is_file():
            df = pd.read_parquet(f, columns=["id", *PROFILE])
            df.insert(1, "source", df["id"].map(sources))
            answers = pool_answers(mfile.parent / "config_resolved.yaml")
            if answers:  # a label-like pool: which answer each subset holds (subset_profile)
                df.insert(2, "answer", df["id"].map(answers))
            write_text(out_file, df.to_csv(index=False, float_format="%.5g"))
            return True
    return False


def subset_profile(
    sel_dir: Path, pool_csv: Path, out_dir: Path, domain: str, budget: str = "p5", seed: int = 0
) -> None:
    """What each method picked, in the warm-up model's eyes: per subset at ``budget`` and ``seed``
    the :data:`PROFILE` summaries against the pool's (first row) and, on a label-like pool, the
    share of each answer, with the pool's Spearman correlation of each gradient norm with length; ``profile_<domain>.md`` and a box plot of the
    subsets' lengths, ``lengths_<domain>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    pool = read_pool_features(pool_csv).set_index("id")
    subsets = {"pool": pool}
    for name, ids in selected_subsets(sel_dir, budget, seed).items():
        subsets[name] = pool.loc[pool.index.intersection(sorted(ids))]
    if len(subsets) < 2:
        return
    table = pd.DataFrame(
        {
            name: {f"{how} {col}": getattr(df[col], how)() for col, how in PROFILE.items()}
            | {"n": len(df)}
            for name, df in subsets.items()
        }
    ).T
    table["n"] = table["n"].astype(int)
    if "answer" in pool.columns:  # label-like pool: % of each answer in every subset
        for a in sorted(pool["answer"].unique()):
            table[f"% {a}"] = [100 * (df["answer"] == a).mean() for df in subsets.values()]
    varies = pool["n_tokens"].nunique() > 1  # legal: every answer has the same length
    rho = {
        c: pool[c].corr(pool["n_tokens"], method="spearman") if varies else None
        for c in ("embed", "lm_head")
    }
    write_text(
        out_dir / f"profile_{domain}.md",
        f"What each {budget} subset (seed {seed}) holds, in the warm-up model's eyes: supervised "
        "tokens, warm-up loss, embedding and LM-head gradient norms (features table of the pool). "
        + (
            "In the pool, Spearman with length: "
            + ", ".join(f"{c} {v:+.2f}" for c, v in rho.items())
            if varies
            else f"Every pool sample has {pool['n_tokens'].iloc[0]} supervised tokens (no length to correlate with)"
        )
        + ".\n\n"
        + table.to_markdown(floatfmt=".4g")
        + "\n",
    )
    order = sorted(subsets, key=lambda k: (k != "pool", subsets[k]["n_tokens"].median()))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1.2))
    ax.boxplot([subsets[k]["n_tokens"].clip(lower=1) for k in order][::-1], orientation="horizontal",
               showfliers=False, widths=0.6)  # fmt: skip
    ax.set_yticks(range(1, len(order) + 1), order[::-1], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("supervised tokens per sample (log)")
    ax.set_title(f"{domain}: lengths of the {budget} subsets (seed {seed}) vs the pool", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"lengths_{domain}.png", dpi=110)
    plt.close(fig)


MAP_METHODS = (  # the panels of selection_map, those present in this order
    "random",
    "grads",
    "grads_paper",
    "grads.stratified.embed+lm_head",
    "grads.density.embed+lm_head",
    "loss_high",
    "less",
    "rds",
)


def selection_map(
    sel_dir: Path, pool_csv: Path, out_dir: Path, domain: str, budget: str = "p5", seed: int = 0
) -> Path | None:
    """Where each method picks in the pool's gradient-norm plane: one panel per method of
    :data:`MAP_METHODS` (its ``budget`` subset at ``seed``) over the whole pool (grey), the two
    norms the GrADS signal combines on log axes, selected samples coloured by their answer on a
    label-like pool; ``map_<domain>.png``. Shows at a glance whether a rule takes the dense middle,
    the high-gradient tail or one class."""
    pool = read_pool_features(pool_csv).set_index("id")
    subsets = selected_subsets(sel_dir, budget, seed)
    subsets = {m: subsets[m] for m in MAP_METHODS if m in subsets}
    if not subsets:
        return None
    fig = map_figure(pool, subsets)  # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    fig.suptitle(f"{domain}: the {budget} subsets (seed {seed}) in the pool's gradient-norm plane",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    out = out_dir / f"map_{domain}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def map_figure(pool, subsets: dict[str, set[str]]):
    """:func:`selection_map`'s figure: per subset a panel, the pool grey (first scatter), then the
    selected samples, one scatter per answer (one in all on a free-text pool)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    x, y = pool["embed"].clip(lower=1e-6), pool["lm_head"].clip(lower=1e-6)
    classes = sorted(pool["answer"].unique()) if "answer" in pool.columns else [None]
    cols = min(4, len(subsets))
    rows = -(-len(subsets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), sharex=True, sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, (name, ids) in zip(axes.flat, subsets.items(), strict=False):
        ax.scatter(x, y, s=3, c="0.85", linewidths=0)
        chosen = pool.index.isin(sorted(ids))
        for i, a in enumerate(classes):
            mask = chosen & ((pool["answer"] == a).to_numpy() if a is not None else True)
            ax.scatter(x[mask], y[mask], s=9, color=f"C{i}", label=a, linewidths=0)
        ax.set(xscale="log", yscale="log", title=f"{name} (n={int(chosen.sum())})")
        ax.title.set_fontsize(8)
        for axis in (ax.xaxis, ax.yaxis):  # 1-2-5 ticks as plain numbers: the range is ~1 decade
            axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(subsets) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("embedding gradient norm", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("LM-head gradient norm", fontsize=8)
    if classes != [None]:
        axes.flat[0].legend(title="answer", fontsize=7, title_fontsize=7, markerscale=1.5)
    return fig


def selection_overlap(
    sel_dir: Path, n_pool: int, out_dir: Path, domain: str, budget: str = "p5", seed: int = 0
) -> None:
    """Do the methods select alike? Jaccard overlap of the subsets of every pair of methods at
    ``budget`` and ``seed`` (``full`` left out), against what two random subsets of that size share
    in expectation (k / (2n - k)): ``overlap_<domain>.{md,png}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    subsets = selected_subsets(sel_dir, budget, seed)
    if len(subsets) < 2:
        return
    names = list(subsets)
    jac = pd.DataFrame(
        [
            [len(subsets[a] & subsets[b]) / len(subsets[a] | subsets[b]) for b in names]
            for a in names
        ],
        index=names,
        columns=names,
    )
    k = sum(len(v) for v in subsets.values()) / len(subsets)
    chance = k / (2 * n_pool - k)
    write_text(
        out_dir / f"overlap_{domain}.md",
        f"Jaccard overlap of the {budget} subsets (seed {seed}); two random subsets of "
        f"{k:.0f} out of {n_pool} share {chance:.3f} in expectation.\n\n"
        + jac.round(3).to_markdown()
        + "\n",
    )
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 2.5, 0.45 * len(names) + 1.5))
    im = ax.imshow(jac.to_numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for (i, j), v in pd.DataFrame(jac.to_numpy()).stack().items():
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="black" if v > 0.6 else "white")  # fmt: skip
    fig.colorbar(im, ax=ax, label=f"Jaccard (random pair: {chance:.3f})", shrink=0.8)
    ax.set_title(f"{domain}: do the methods select alike? ({budget}, seed {seed})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"overlap_{domain}.png", dpi=110)
    plt.close(fig)


def update_results_md(
    results_md: Path, domain: str, results_dir: Path, generated: str | None = None
) -> bool:
    """Replace the block between ``<!-- tables:<domain>:begin -->`` and ``<!-- tables:<domain>:end -->``
    in RESULTS.md with the collector's Markdown for the domain (tables are generated, never typed),
    or with ``generated`` when given.

    Returns whether the block was found (a RESULTS.md without the markers is left alone).
    """
    begin, end = f"<!-- tables:{domain}:begin -->", f"<!-- tables:{domain}:end -->"
    text = results_md.read_text()
    if begin not in text or end not in text:
        return False
    if generated is None:  # minus the "# <domain>" title
        generated = (results_dir / f"{domain}.md").read_text().split("\n", 1)[1]
    generated = "\n" + generated
    generated = generated.replace("\n## ", "\n#### ")  # nest under RESULTS.md's own headings
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    results_md.write_text(f"{head}{begin}\n{generated.strip()}\n{end}{tail}")
    return True


def pool_sources(config_file: Path) -> dict[str, str]:
    """``{record id: source name}`` of a run's pool (ids are content hashes of the records, so
    ``grads.data.load_records`` on the same data gives the same ids: that is how to train on them)."""
    from omegaconf import OmegaConf

    from grads.data import load_records

    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    records, _ = load_records(cfg["domain"], cfg["data"])
    return {r.id: r.source for r in records}


def pool_answers(config_file: Path) -> dict[str, str] | None:
    """``{record id: answer}`` of a run's pool when its answers are labels (at most
    ``grads.selectors.balance.MAX_ANSWER_CLASSES`` distinct: legal's Yes/No), else ``None``."""
    from omegaconf import OmegaConf

    from grads.selectors.balance import answer_labels

    if not config_file.is_file():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    if "domain" not in cfg:  # not a pipeline run's config
        return None
    return answer_labels(cfg)


def answer_classes(runs_dir: Path) -> dict[str, int]:
    """The pool's answers and their counts when they are labels (``{}`` for free text), from any
    run of the domain (every run shares the pool)."""
    from collections import Counter

    config = next(iter(sorted((runs_dir / "main_p5").rglob("config_resolved.yaml"))), None)
    if config is None:
        raise SystemExit(f"no main_p5 run under {runs_dir}: run that phase first")
    answers = pool_answers(config)
    return dict(sorted(Counter(answers.values()).items())) if answers else {}


def best_ablation_cell(runs_dir: Path) -> dict:
    """The Table 2 cell other than the default with the lowest headline metric at seed 0 (needs the
    whole grid of this domain's ablation sweeps): the one ``ablation_seeds`` runs on seeds 1 and 2."""
    from grads.report import collect, default_grads_run, is_ablation

    rows = [r for ph in ABLATION if (runs_dir / ph).is_dir() for r in collect(runs_dir / ph)[0]]
    scores = {
        r["selector"]: r[HEADLINE]
        for r in rows
        if is_ablation(r["selector"]) and r["seed"] == 0 and r.get(HEADLINE) is not None
    }
    scores.pop(default_grads_run(), None)  # main_p5's `grads`: seeds_p5 ran it on 3 seeds
    want = 3 * len(RULES) - 1
    if len(scores) < want:
        raise SystemExit(
            f"the ablation under {runs_dir} has {HEADLINE} for {len(scores)} of its {want} cells: "
            "run (or finish) the ablation phase first"
        )
    best = min(scores, key=scores.get)
    _, rule, source = best.split(".")
    return {"ablation_scores": scores, "best_cell": best, "rule": rule, "layers": source.split("+")}


def grid_leader(domain: str, runs_dir: Path, tables_dir: Path) -> dict:
    """The Table 2 cell that leads across domains (:func:`grads.report.ablation_summary`'s winner
    over this domain's runs and the collected CSVs ``<tables_dir>/<other>/<other>.csv`` of the
    other domains): the cell the default decision pairs with the default. ``leader_seeds`` are the
    seeds of 1 and 2 it has not run in this domain (empty when it is the default, which
    ``seeds_p5`` ran, or when ``ablation_seeds`` already ran it). Needs this domain's grid."""
    import pandas as pd

    from grads.report import (
        ablation_summary,
        as_current_default,
        collect,
        default_grads_run,
        read_csvs,
        with_default_cell,
    )

    best_ablation_cell(runs_dir)  # raises while this domain's grid is incomplete
    here = pd.DataFrame(collect(runs_dir)[0])
    others = [p for d in DOMAINS if d != domain and (p := tables_dir / d / f"{d}.csv").is_file()]
    frames = [here, read_csvs(others)[0]] if others else [here]
    df = with_default_cell(as_current_default(pd.concat(frames, ignore_index=True)))
    table, leader, default = ablation_summary(df)
    if leader is None:
        raise SystemExit(f"no Table 2 cell is present in every domain of {tables_dir} and {domain}")
    ran = set(here.loc[here["selector"] == leader, "seed"].astype(int))
    missing = [] if leader == default_grads_run() else sorted({1, 2} - ran)
    _, rule, source = leader.split(".")
    domains = [c.removeprefix("Δ bpb ") for c in table.columns if c.startswith("Δ bpb ")]
    return {
        "leader": leader,
        "leader_rule": rule,
        "leader_layers": source.split("+"),
        "leader_seeds": missing,
        "leader_over": domains,
    }


def default_at_p50(runs_dir: Path) -> dict:
    """``default_p50``: when the ``grads`` default (``conf/selector/grads.yaml``) changed after
    ``main_p50`` ran the old one, the new default at 50 % (seed 0), in a folder of its own so the old
    default's run stays (it becomes its Table 2 cell's 50 % row). Nothing while ``main_p50`` has not
    run ``grads`` (it will run the current default) or once the current default has a 50 % run."""
    from grads.report import collect, default_grads_run

    default = default_grads_run()
    rows = [r for r in collect(runs_dir)[0] if r["budget"] == "p50" and r.get("grads_cell")]
    ran = {r["grads_cell"] for r in rows}
    todo = [0] if ran and default not in ran else []
    return {"default_cell": default, "default_p50": todo}


def phase_dir(phase: str, plan: dict, runs_dir: Path) -> Path:
    """Where a phase's jobs go: ``leader_seeds`` one folder per leader, so that a later leader (once
    more domains are in) adds runs instead of overwriting the earlier leader's."""
    if phase == "leader_seeds":
        return runs_dir / phase / plan["leader"]
    if phase == "default_p50":
        return runs_dir / phase / plan["default_cell"]
    return runs_dir / phase


# phases whose jobs follow the grads default: main_p5..main_p50 run `grads`; an ablation sweep
# leaves the default's cell out (it is main_p5's `grads` run)
FOLLOW_DEFAULT = ("main_p5", "seeds_p5", "main_p50", "seeds_p50", *ABLATION)


def check_default_unchanged(phase: str, runs_dir: Path) -> None:
    """Refuse to rerun a phase whose finished jobs ran under another ``grads`` default: Hydra
    numbers the jobs of a sweep, so the new default's jobs would overwrite the old default's runs
    (a Table 2 cell, seeds included) in their folders."""
    if phase not in FOLLOW_DEFAULT or not (runs_dir / phase).is_dir():
        return
    from grads.report import collect, default_grads_run

    default = default_grads_run()
    cells = {r.get("grads_cell") for r in collect(runs_dir / phase)[0]}
    stale = [c for c in cells if c and c != default] if phase not in ABLATION else []
    if phase in ABLATION and default in cells:  # swept leaving out an earlier default
        stale = [default]
    if stale:
        raise SystemExit(
            f"{runs_dir / phase} ran under another grads default ({', '.join(sorted(stale))} vs "
            f"today's {default} in conf/selector/grads.yaml); rerunning it would overwrite those "
            "runs. Finished phases need no rerun: the new default's 5 % runs are its Table 2 cell "
            "and leader_seeds, its 50 % run is default_p50. To start over under the new default, "
            "give another --runs-dir."
        )


def phase_plan(
    phase: str, runs_dir: Path, plan_file: Path, dry_run: bool, domain: str = "legal"
) -> dict:
    """What a phase needs from earlier ones (strongest baselines, best ablation cell), merged into
    ``plan_file`` before the phase runs; placeholders in a dry run before those phases exist."""
    if phase in ("seeds_p5", "main_p50"):
        if dry_run and not (runs_dir / "main_p5").exists():
            return {"strongest": ["<best baseline>", "<second baseline>"]}
        new = strongest_baselines(runs_dir)
        print(f"strongest baselines by {HEADLINE}: {new['strongest'][:2]}")
    elif phase == "ablation_seeds":
        if dry_run and not any((runs_dir / ph).exists() for ph in ABLATION):
            return {"rule": "<best rule>", "layers": ["<best source>"]}
        new = best_ablation_cell(runs_dir)
        print(f"best ablation cell by {HEADLINE} (seed 0): {new['best_cell']}")
    elif phase == "leader_seeds":
        if dry_run and not any((runs_dir / ph).exists() for ph in ABLATION):
            return {"leader": "<leader>", "leader_rule": "<rule>", "leader_layers": ["<source>"],
                    "leader_seeds": [1, 2]}  # fmt: skip
        new = grid_leader(domain, runs_dir, plan_file.parent.parent)
        print(
            f"Table 2 leader over {', '.join(new['leader_over'])}: {new['leader']}; "
            f"seeds to run here: {new['leader_seeds'] or 'none'}"
        )
    elif phase == "default_p50":
        new = default_at_p50(runs_dir)
    elif phase == "balanced":
        if dry_run and not (runs_dir / "main_p5").exists():
            return {"balanced": BALANCED}
        classes = answer_classes(runs_dir)
        new = {"balanced": BALANCED if classes else [], "answer_classes": classes}
        print(f"answers: {classes or 'not label-like (free text): nothing to balance'}")
    else:
        return {}
    plan = {**(read_json(plan_file) if plan_file.is_file() else {}), **new}
    if not dry_run:
        write_json(plan_file, plan)
    return plan


def phase_status(domain: str, runs_dir: Path, plan_file: Path) -> list[tuple[str, int, int]]:
    """``(phase, finished jobs, planned jobs)`` for every phase of the domain (a phase that depends
    on an unfinished one, for the strongest baselines or the best ablation cell, is counted with
    stand-in names: the count does not depend on them)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for phase in expand_phases(ALL_PHASES):
        # what it depends on may not have finished: any names give the same job count
        stand_in = {
            "strongest": BASELINES[:2],
            "rule": RULES[0],
            "layers": ["embed"],
            "leader": "<leader>",
            "leader_rule": RULES[0],
            "leader_layers": ["embed"],
            "leader_seeds": [1, 2],
            "default_cell": "<default>",
            "default_p50": [0],
            "balanced": BALANCED,
        }
        try:
            plan = phase_plan(phase, runs_dir, plan_file, dry_run=True, domain=domain)
        except SystemExit:
            plan = stand_in
        if any("<" in str(v) for v in plan.values()):  # a dry run's placeholders
            plan = stand_in
        done = (
            sum(1 for _ in (runs_dir / phase).rglob("metrics.json"))
            if (runs_dir / phase).is_dir()
            else 0
        )
        if phase in TOP_UP:  # what ran + what is still lacking
            planned = done + len(plan[phase])
        elif phase == "balanced" and not plan["balanced"]:
            planned = 0
        else:
            ov = parser.parse_overrides(phase_overrides(phase, plan))
            planned = len(BasicSweeper.split_arguments(ov, max_batch_size=None)[0])
        out.append((phase, done, planned))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("domain", choices=DOMAINS)
    ap.add_argument("--phases", nargs="+", default=PHASES, choices=ALL_PHASES,
                    help=f"default: {' '.join(PHASES)} (opt-in: {' '.join(EXTRA_PHASES)})")  # fmt: skip
    ap.add_argument("--runs-dir", default=None, help="default: <repo>/outputs/tables/<domain>")
    ap.add_argument("--results-dir", default=None, help="default: <repo>/results/tables/<domain>")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--status", action="store_true", help="finished / planned jobs per phase")
    ap.add_argument(
        "--views-only",
        action="store_true",
        help="regenerate sources_/overlap_/profile_/lengths_ from the committed selections",
    )
    ap.add_argument("overrides", nargs="*", help="extra overrides for every phase (key=value)")
    args = ap.parse_args(argv)
    runs_dir = Path(args.runs_dir or REPO_ROOT / "outputs" / "tables" / args.domain).resolve()
    results_dir = Path(args.results_dir or REPO_ROOT / "results" / "tables" / args.domain).resolve()
    if args.status:
        for phase, done, planned in phase_status(args.domain, runs_dir, results_dir / "plan.json"):
            print(f"{phase:17s} {done:3d} / {planned:3d} jobs{'  done' if done >= planned else ''}")
        return
    if args.views_only:
        selection_views(args.domain, results_dir)
        return
    if args.collect_only:
        collect_domain(args.domain, runs_dir, results_dir)
        return
    plan_file = results_dir / "plan.json"
    phases = expand_phases(args.phases)
    for phase in phases:
        check_default_unchanged(phase, runs_dir)
        plan = phase_plan(phase, runs_dir, plan_file, args.dry_run, args.domain)
        if (phase in TOP_UP or phase == "balanced") and not plan[phase]:
            print(f"== {phase}: nothing to run here", flush=True)
            continue
        cmd = [
            sys.executable,
            "-m",
            "grads.cli",
            "-m",
            *phase_overrides(phase, plan),
            f"domain={args.domain}",
            f"hydra.sweep.dir={phase_dir(phase, plan, runs_dir)}",
            *args.overrides,
        ]
        print(f"== {phase}: {shlex.join(cmd[2:])}", flush=True)  # quoted: pastes into a shell
        if args.dry_run:
            continue
        t0 = time.time()
        rc = subprocess.run(cmd).returncode
        print(f"== {phase} {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
              f"{(time.time() - t0) / 60:.1f} min", flush=True)  # fmt: skip
        collect_domain(args.domain, runs_dir, results_dir)  # what finished is kept either way
        if rc != 0:  # later phases read this one's results (plan.json): stop here
            raise SystemExit(
                f"phase {phase} had failed jobs (Hydra runs every job of a sweep, then fails); "
                f"the finished ones are collected under {results_dir}; fix and rerun: finished "
                "stages are cache hits"
            )


if __name__ == "__main__":
    main()
