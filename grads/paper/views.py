"""What the selected subsets are made of, from the published selections alone.

Every view reads ``<results>/selections/<method>_<budget>_seed<k>.jsonl`` (the ids each run
selected, with their pool source) and ``<results>/pool_features.csv`` (the warm-up model's view of
every pool sample), so they regenerate without the runs or the cache (``run_tables.py
--views-only``):

* ``sources_<domain>.{md,png}``: each subset by pool source, against the pool;
* ``overlap_<domain>.{md,png}``: Jaccard overlap between methods, against chance;
* ``profile_<domain>.md`` / ``lengths_<domain>.png``: length, warm-up loss and gradient norms of
  each subset against the pool (and each answer's share on a label-like pool);
* ``map_<domain>.png``: each subset in the pool's gradient-norm plane.
"""

from __future__ import annotations

from pathlib import Path

from grads.io import read_jsonl, write_text


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
