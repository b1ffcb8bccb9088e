"""Cost of evaluating one model (domain + general + KL) with an eval suite, beside a forward benchmark.

Runs the evaluate stage exactly as the pipeline does (``grads.evaluation.run_evaluate``) on one
"tuned" model with the base-model cache warm (the base results are computed first if missing), so
the wall time is what every fine-tuned model of a sweep costs: lm-eval on all parts for the tuned
model, plus the KL pass (base + tuned forward on the KL items). The base model itself stands in
for the tuned one (the cost does not depend on the weights).

On a shared machine a wall time alone says little, so a fixed forward benchmark (batch 8 x 256
tokens) runs right before and after, and the script prints the ratio ``eval wall / benchmark wall``
(load-independent to first order) and the load average. Multiply the ratio by the benchmark's idle
time to estimate the idle cost.

Usage:
    python scripts/bench_eval.py --suite quick --domain medical
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def forward_bench(model, reps: int = 3) -> float:
    """Median seconds of one no-grad forward over 8 x 256 random tokens."""
    import torch

    x = torch.randint(100, 20000, (8, 256))
    times = []
    with torch.no_grad():
        model(x[:1, :16])
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--out", default="/tmp/grads-bench-eval", help="stage output folder")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grads.evaluation import run_evaluate
    from grads.models import load_model

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        ovr = [f"eval={args.suite}", f"domain={args.domain}", *args.override]
        cfg = OmegaConf.to_container(compose("config", overrides=ovr), resolve=True)

    def load():
        return load_model(cfg["model"], cache_dir=cfg["paths"]["model_dir"])

    model, tok = load()
    run_evaluate(cfg, model, tok, Path(args.out) / "warm", load)  # base cache warm-up (or hit)
    before, load0 = forward_bench(model), os.getloadavg()
    t0 = time.perf_counter()
    m = run_evaluate(cfg, model, tok, Path(args.out) / "timed", load)
    wall = time.perf_counter() - t0
    after, load1 = forward_bench(model), os.getloadavg()
    bench = (before + after) / 2
    hits = {p: i["cache"] for p, i in m["base_cache"].items()}
    print(f"suite {args.suite}, domain {args.domain}: {m['n_items']} items, base cache {hits}")
    print(
        f"evaluated model: {wall:.1f} s (lm-eval {m['eval_wall_s']:.1f} s, KL {m['kl_wall_s']} s)"
    )
    print(f"forward benchmark 8x256: {before:.2f} s before, {after:.2f} s after")
    print(f"ratio eval / benchmark: {wall / bench:.0f}")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (1 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
