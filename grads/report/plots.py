"""Plots of a collected sweep: the headline metrics, the paired differences, gain vs forgetting and
accuracy vs budget, one figure per domain (``<kind>_<domain>.png``)."""

from __future__ import annotations

import math
from pathlib import Path

from grads.evaluation.metrics import ITEM_METRICS
from grads.report.paired import PAIRED_METRICS
from grads.report.tables import budget_key, full_once, mean_std


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
        groups = [("all", full_once(g))] if sel == "full" else list(g.groupby("budget"))
        for b, gb in groups:
            mb, sb, n = mean_std(gb["domain_bpb"].tolist())
            mk, sk, _ = mean_std(gb["general_kl"].tolist())
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
        key=lambda k: (budget_key(k[0]), k[1]),
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
            groups = [("all", full_once(g))] if sel == "full" else list(g.groupby("budget"))
            for b, gb in groups:
                mk = markers.setdefault(b, "osD^vP*"[len(markers) % 7])
                mg, sg, n = mean_std(gb["domain_gain"].tolist())
                mf, sf, _ = mean_std(gb["forgetting"].tolist())
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
        budgets = sorted(ddf["budget"].dropna().unique(), key=budget_key)
        xs = list(range(len(budgets)))
        for i, (sel, g) in enumerate(ddf.groupby("selector")):
            if sel == "full":
                m, s, n = mean_std(g["domain_acc"].tolist())
                if n:
                    ax.axhline(m * 100, color="k", ls="--", lw=1, label="full pool")
                continue
            ys = [mean_std(g[g["budget"] == b]["domain_acc"].tolist()) for b in budgets]
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
