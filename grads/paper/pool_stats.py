"""Print each domain's train-pool size and token-length distribution under a model's chat template.

Usage: python scripts/pool_stats.py [--domains medical legal financial synthetic] [--max-seq-len 4096]
"""

from __future__ import annotations

import argparse
import json

from grads.constants import conf_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", nargs="+", default=["synthetic", "medical", "legal", "financial"])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--max-seq-len", type=int, default=100_000, help="no truncation by default")
    ap.add_argument("--out", default="outputs/pool_stats.json")
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grads.data.pool import load_pool, pool_summary
    from grads.io import write_json
    from grads.models import load_model

    results = {}
    tokenizer = None
    for name in args.domains:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"domain={name}",
                    f"model={args.model}",
                    f"data.max_seq_len={args.max_seq_len}",
                ],
            )
        cfg = OmegaConf.to_container(cfg, resolve=True)
        if tokenizer is None:
            tokenizer = load_model(cfg["model"], cache_dir=cfg["paths"]["model_dir"])[1]
        pool, stats = load_pool(cfg, tokenizer, return_stats=True)
        results[name] = {"filter_stats": stats, **pool_summary(pool)}
        s = results[name]
        print(
            f"{name:10s} n={s['n']:6d} tokens={s['tokens_total']:9d} length {s['length']} "
            f"response {s['response_tokens']}"
        )
    write_json(args.out, results)
    print(json.dumps({k: v["sources"] for k, v in results.items()}))
