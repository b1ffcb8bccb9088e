"""Benchmark the select stage against a plain ``numpy.argsort`` of the same column.

For each pool size, builds a synthetic features table with log-normal, correlated ``embed`` /
``lm_head`` gradient norms, times ``selector.select(table, budget, seed)`` (best of ``--repeats``)
and, in the same process, ``np.argsort`` of the ``embed`` column, and prints both with their ratio.
Acceptance for the default GrADS selector at 5%: ratio <= 5 at 10^7 and roughly linear scaling.

Usage:
    python scripts/bench_select.py                       # grads, p5, 1e5 / 1e6 / 1e7
    python scripts/bench_select.py --selector grads_stratified --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def synthetic_features(n: int, seed: int = 0) -> pd.DataFrame:
    """A features table shaped like the real one: log-normal norms, the LM head ~4x the embedding."""
    rng = np.random.default_rng(seed)
    log_embed = rng.normal(-2.0, 0.8, n)
    return pd.DataFrame(
        {
            "id": pd.Series(np.arange(n)).astype(str),
            "loss": np.abs(rng.normal(1.5, 0.5, n)),
            "n_tokens": rng.integers(1, 512, n),
            "embed": np.exp(log_embed),
            "lm_head": np.exp(1.4 + 0.9 * log_embed + rng.normal(0.0, 0.4, n)),
        }
    )


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        del out
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def compose_group(group: str, name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(f"{group}/{name}")[group]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--selector", default="grads", help="conf/selector/<name>.yaml")
    p.add_argument("--budget", default="p5", help="conf/budget/<name>.yaml")
    p.add_argument("--sizes", type=int, nargs="+", default=[10**5, 10**6, 10**7])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = p.parse_args(argv)

    from hydra.utils import instantiate

    from grads.io import write_json
    from grads.selectors.budget import parse_budget

    selector = instantiate(compose_group("selector", args.selector))
    budget = parse_budget(compose_group("budget", args.budget))
    rows = []
    header = (
        f"{'n':>12} {'select_s':>10} {'argsort_s':>10} {'ratio':>7} {'ns/sample':>10} "
        f"{'selected':>10}"
    )
    print(
        f"selector={args.selector} budget={budget.name} repeats={args.repeats} "
        f"cpus={os.cpu_count()} numpy={np.__version__}"
    )
    print(header)
    for n in args.sizes:
        table = synthetic_features(n, args.seed)
        t_sel, sel = best_of(lambda t=table: selector.select(t, budget, args.seed), args.repeats)
        column = table["embed"].to_numpy()
        t_sort, _ = best_of(lambda c=column: np.argsort(c), args.repeats)
        row = {
            "n": n,
            "select_s": t_sel,
            "argsort_s": t_sort,
            "ratio": t_sel / t_sort,
            "ns_per_sample": 1e9 * t_sel / n,
            "selected": len(sel),
            "breakdown_s": sel.diagnostics.get("timings_s"),
            "bandwidth": sel.diagnostics.get("bandwidth"),
            "n_fit": sel.diagnostics.get("n_fit"),
        }
        rows.append(row)
        print(
            f"{n:>12,} {t_sel:>10.4f} {t_sort:>10.4f} {row['ratio']:>7.2f} "
            f"{row['ns_per_sample']:>10.1f} {len(sel):>10,}",
            flush=True,
        )
        del table, sel, column
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        scale = (b["select_s"] / a["select_s"]) / (b["n"] / a["n"])
        print(
            f"scaling {a['n']:,} -> {b['n']:,}: time x{b['select_s'] / a['select_s']:.1f} for "
            f"n x{b['n'] / a['n']:.0f} ({scale:.2f} of linear)"
        )
    result = {
        "selector": args.selector,
        "budget": budget.to_dict(),
        "repeats": args.repeats,
        "seed": args.seed,
        "rows": rows,
        "env": {
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    path = args.out / f"select_{args.selector}_{budget.name}.json"
    write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
