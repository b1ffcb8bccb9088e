"""Benchmark the baselines' extra passes against the GrADS features pass, side by side.

On the same tokenised domain samples (``--domain``, first ``--n`` of the pool after
``pool_limit``) and the same model, times:

* ``features``  the GrADS features pass (``grads.features.compute.compute_shard``: per-sample embedding /
  LM-head gradient norms with per-token statistics), what every GrADS rule needs;
* ``less``      LESS's pool pass (``grads.features.representations.lora_grad_matrix``): exact per-sample
  LoRA gradients (LoRA as the warm-up: ``trainer.lora`` knobs on ``model.lora_target_modules``),
  Adam preconditioning (with stand-in moments of the right shape) and the CPU default projection
  (CountSketch to ``--proj-dim``), unit-normalised;
* ``less_dense`` the same with the dense Rademacher projection LESS uses (the GPU default). Not in the
  default modes: on a CPU it costs minutes per buffered chunk (generating ``P x d`` signs), so the
  script instead times one generated block and extrapolates (``dense_estimate``);
* ``rds``       RDS+'s pass (``grads.features.representations.hidden_matrix``): position-weighted mean-pooled
  final hidden states of the base model, forward only.

The modes are interleaved round-robin (``--warmup`` rounds on 4 samples first, then the median of
``--repeats`` full rounds) so that load from other processes hits all alike; ratios are against ``features`` measured in the same
rounds. Model loading and the (small) target-set passes are not timed.

Usage::

    GRADS_MODEL_DIR=/work/models python scripts/bench_baselines.py              # SmolLM2, 64 samples
    python scripts/bench_baselines.py --model tiny --n 32 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

MODES = ("features", "less", "less_dense", "rds")
DEFAULT_MODES = ("features", "less", "rds")


def _setup(args):
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from grads.data.pool import load_pool
    from grads.models import build_tiny, load_model, model_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        model_cfg = {"source": "tiny", "lora_target_modules": ["q_proj", "v_proj"]}
        base, tok = build_tiny(tied=True)
        lora_base = build_tiny(tied=True)[0]
    else:
        model_cfg = model_config("smollm2_135m")
        cache = os.environ.get("GRADS_MODEL_DIR", "outputs/models")
        base, tok = load_model(model_cfg, cache_dir=cache)
        lora_base = load_model(model_cfg, cache_dir=cache)[0]
    from tests.conftest import compose

    cfg = OmegaConf.to_container(
        compose(
            [
                f"domain={args.domain}",
                f"domain.pool_limit={args.n}",
                f"data.max_seq_len={args.seq}",
            ]
        ),
        resolve=True,
    )
    pool = load_pool(cfg, tok)
    lora = cfg["trainer"]["lora"]
    torch.manual_seed(0)
    peft = get_peft_model(
        lora_base,
        LoraConfig(
            r=int(lora["r"]),
            lora_alpha=int(lora["alpha"]),
            lora_dropout=float(lora["dropout"]),
            target_modules=list(model_cfg["lora_target_modules"]),
        ),
    )
    with torch.no_grad():  # a trained adapter has B != 0; the cost does not depend on the values
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 1e-3)
    base.eval()
    peft.eval()
    return cfg, base, peft, tok, pool


def _runners(args, cfg, base, peft, tok, pool):
    import torch

    from grads.features.compute import compute_shard, features_settings
    from grads.features.representations import (
        Projector,
        hidden_matrix,
        lora_grad_matrix,
        lora_parameters,
    )

    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in pool]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    fcfg = features_settings({"features": {"batch_size": args.batch, "progress": False}})
    sizes = [p.numel() for _, p in lora_parameters(peft)]
    m = torch.full((sum(sizes),), 1e-4)
    adam = (m, m.square(), (0.9, 0.999), 1e-8)
    sketch = Projector(sizes, args.proj_dim, "countsketch", 0)
    dense = Projector(sizes, args.proj_dim, "rademacher", 0)

    def features():
        compute_shard(fcfg, base, pad, "right", pool, list(range(len(pool))), progress=False)

    def less():
        lora_grad_matrix(peft, rows, pad, sketch, args.batch, adam=adam)

    def less_dense():
        lora_grad_matrix(peft, rows, pad, dense, args.batch, adam=adam)

    def rds():
        hidden_matrix(base, rows, pad, args.batch)

    return {"features": features, "less": less, "less_dense": less_dense, "rds": rds}, sum(sizes)


def _dense_estimate(args, n_lora: int, n: int, block_rows: int = 1 << 15) -> dict:
    """Seconds the dense Rademacher projection adds to the LESS pass, from one timed block.

    The pass buffers ``buffer_bytes // (4 P)`` samples per chunk and generates every ``block_rows x
    d`` block once per chunk (generation dominates the matrix product on a CPU).
    """
    import torch

    from grads.features.representations import DEFAULTS, Projector

    chunk = max(1, int(DEFAULTS["lora_grads"]["buffer_bytes"]) // (4 * n_lora))
    proj = Projector([block_rows], args.proj_dim, "rademacher", 0, block_rows=block_rows)
    x = torch.randn(min(chunk, n), block_rows)
    t0 = time.perf_counter()
    proj.project(x)
    one = time.perf_counter() - t0
    blocks, chunks = -(-n_lora // block_rows), -(-n // chunk)
    return {
        "block_rows": block_rows,
        "block_s": one,
        "blocks": blocks,
        "chunk": chunk,
        "chunks": chunks,
        "projection_s": one * blocks * chunks,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--n", type=int, default=64, help="pool samples per pass")
    ap.add_argument("--seq", type=int, default=256, help="data.max_seq_len")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"subset of {MODES}")
    ap.add_argument("--out", default="outputs/bench")
    args = ap.parse_args(argv)

    cfg, base, peft, tok, pool = _setup(args)
    runners, n_lora = _runners(args, cfg, base, peft, tok, pool)
    # Warm-up rounds (lazy initialisation, allocator growth) on a few samples only.
    small, _ = _runners(args, cfg, base, peft, tok, pool.select(range(min(4, len(pool)))))
    modes = args.modes.split(",")
    times: dict[str, list[float]] = {m: [] for m in modes}
    load_before = os.getloadavg()
    for _ in range(args.warmup):
        for mode in modes:
            small[mode]()
    for _ in range(args.repeats):
        for mode in modes:
            t0 = time.perf_counter()
            runners[mode]()
            times[mode].append(time.perf_counter() - t0)
            print(f"  {mode}: {times[mode][-1]:.2f}s", flush=True)
    load_after = os.getloadavg()
    dense = _dense_estimate(args, n_lora, len(pool))
    tokens = sum(len(x) for x in pool["input_ids"])
    med = {m: statistics.median(v) for m, v in times.items()}
    lines = [
        f"model={args.model} domain={args.domain} n={len(pool)} tokens={tokens} seq<={args.seq} "
        f"batch={args.batch} lora_params={n_lora:,} proj_dim={args.proj_dim} "
        f"repeats={args.repeats} loadavg(1m) {load_before[0]:.1f}->{load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs (shared machine: absolute times are loaded, ratios are "
        f"side by side)",
        f"{'mode':<12}{'median s':>10}{'samples/s':>11}{'x features':>12}",
    ]
    for m in modes:
        ratio = med[m] / med["features"] if "features" in med else float("nan")
        lines.append(f"{m:<12}{med[m]:>10.2f}{len(pool) / med[m]:>11.1f}{ratio:>12.2f}")
    lines.append(
        f"less_dense (estimated: one {dense['block_rows']}-row block of the dense projection timed, "
        f"x{dense['blocks']} blocks x{dense['chunks']} chunks of {dense['chunk']} samples): "
        f"+{dense['projection_s']:.0f}s of projection on top of the less pass"
    )
    print("\n".join(lines))
    summary = {
        "dense_estimate": dense,
        "args": vars(args),
        "n_samples": len(pool),
        "tokens": tokens,
        "lora_params": n_lora,
        "times_s": times,
        "median_s": med,
        "ratio_to_features": {m: med[m] / med["features"] for m in modes if "features" in med},
        "loadavg": [load_before, load_after],
        "table": lines,
    }
    from grads.io import write_json

    out = Path(args.out) / f"baselines_{args.model}_{args.domain}_n{args.n}.json"
    write_json(out, summary)
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
