"""``verdict.png``: each compared selector's paired difference with its 95 % CI, the reference at 0.

Two panels, held-out bits per byte (learn more: left of 0 is better) and KL(base || tuned) on the
general reference answers (forget less: left of 0 is better); the grey band is +-MDD of the run
(differences inside it cannot be told from noise with these seeds).
"""

from __future__ import annotations

from pathlib import Path

from grads.evaluation.metrics import ITEM_METRICS
from grads.verdict.plan import FORGET, LOSS

PANELS = ((LOSS, "held-out bits per byte"), (FORGET, "KL(base || tuned), nats/token"))


def plot(report: dict, path: str | Path) -> Path:
    """Draw the verdict figure of a ``verdict.json`` report to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["selectors"]
    against = report["against"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.6 + 0.55 * max(1, len(rows))), sharey=True)
    ys = list(range(len(rows)))[::-1]
    for ax, (metric, title) in zip(axes, PANELS):
        mdds = [r["mdd"].get(metric) for r in rows if r["mdd"].get(metric) is not None]
        if mdds:
            band = max(mdds)
            ax.axvspan(-band, band, color="0.9", label=f"±MDD ({band:.3g})")
        ax.axvline(0.0, color="0.3", lw=1, label=f"{against} (reference)")
        for y, r in zip(ys, rows):
            d = r.get(metric)
            if d is None:
                continue
            colour = _colour(d, ITEM_METRICS[metric].higher_is_better, r["detectable"])
            err = [[d["diff"] - d["lo"]], [d["hi"] - d["diff"]]]
            ax.errorbar(d["diff"], y, xerr=err, fmt="o", color=colour, capsize=4)
        ax.set_title(f"{title}: selector − {against}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_yticks(ys, [f"{r['selector']} (n={r['n_selected']})" for r in rows])
    axes[0].set_ylim(-0.7, len(rows) - 0.3)
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _colour(d: dict, higher_is_better: bool, detectable: bool | None) -> str:
    """Green: significantly better than the reference; red: worse; grey: a tie or inconclusive."""
    if detectable is False or not d["significant"]:
        return "0.45"
    better = (d["diff"] > 0) == higher_is_better
    return "tab:green" if better else "tab:red"


def _title(report: dict) -> str:
    seeds = len(report.get("seeds") or [])
    return (
        f"{report['domain']} / {report['model']} / budget {report['budget']}: paired difference, "
        f"95 % CI over {seeds} seed(s) and the held-out items"
    )
