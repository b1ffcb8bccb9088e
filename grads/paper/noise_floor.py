"""Measure the evaluation's noise floor: the base model and ``random`` at 5 % over several seeds.

Protocol (the one the later tables use): SmolLM2-135M-Instruct, LoRA, ``data.max_seq_len=256``,
one real domain with ``domain.pool_limit=1000``, ``selector=random budget=p5``, seeds 0, 1, 2, the
``quick`` suite. The base model's results come from the evaluate stage's base cache.

Model-free shortcut. The pipeline's ``select`` stage reads the features table, which normally needs
a warm-up epoch and a gradient pass over the pool (an hour of this CPU for 1,000 samples). The random
selector reads one column only, ``loss``, and only to skip samples without a finite loss; its
subset is a seeded draw over the table's rows in pool order. So this script writes that table
itself, into a *dedicated* cache folder: ``id``, ``n_tokens`` and ``loss`` from one forward pass of
the base model over the pool (``grads.features.gradients.per_sample_loss``, no warm-up, no gradients), under
the features key the pipeline computes for this config. The selection is therefore exactly the one
a full pipeline run would make. The table has no gradient columns, so any other selector run
against this cache folder fails on its missing columns instead of using it.

Usage (nice'd, in the background; each stage is cached, so a rerun resumes):
    nohup nice -n 10 python scripts/noise_floor.py run --domain medical > noise.log 2>&1 &
    python scripts/noise_floor.py analyse outputs/noise_floor/medical/runs --out results/noise_floor_medical
    python scripts/noise_floor.py analyse --from-csv results/noise_floor_medical/results.csv
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from grads.constants import REPO_ROOT, conf_dir


def overrides(domain: str, seed: int, cache: Path, extra: list[str]) -> list[str]:
    return [
        f"domain={domain}",
        "domain.pool_limit=1000",
        "model=smollm2_135m",
        "selector=random",
        "budget=p5",
        "eval=quick",
        "logger=none",
        "data.max_seq_len=256",
        "warmup.seed=0",
        f"seed={seed}",
        f"paths.cache_dir={cache}",
        f"group=noise_floor_{domain}",
        *extra,
    ]


def compose(ovr: list[str]) -> dict:
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = _compose("config", overrides=ovr)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def model_free_features(cfg: dict) -> Path:
    """Write the forward-only features table under the pipeline's features key (see docstring)."""
    import torch

    from grads.data.pool import collate, load_pool
    from grads.features.gradients import per_sample_loss
    from grads.io import write_json, write_parquet
    from grads.models import load_model
    from grads.pipeline import StageCache, resolve_features_cfg, stage_keys

    resolved = resolve_features_cfg(cfg)
    key = stage_keys(resolved)["features"]
    cache = StageCache(resolved["paths"]["cache_dir"])

    def run(work: Path) -> dict:
        import pandas as pd

        t0 = time.perf_counter()
        model, tok = load_model(cfg["model"], cache_dir=cfg["paths"]["model_dir"])
        pool = load_pool(cfg, tok)
        rows = []
        bs = 8
        for s in range(0, len(pool), bs):
            batch = [pool[i] for i in range(s, min(s + bs, len(pool)))]
            b = collate(batch, tok.pad_token_id)
            with torch.no_grad():
                loss, n = per_sample_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
            rows += [
                {"id": r["id"], "loss": float(x), "n_tokens": int(k)}
                for r, x, k in zip(batch, loss.tolist(), n.tolist())
            ]
        write_parquet(work / "features.parquet", pd.DataFrame(rows))
        summary = {
            "n": len(rows),
            "model_free_shortcut": True,
            "note": "forward-only loss of the BASE model (no warm-up, no gradient columns); "
            "written by scripts/noise_floor.py for the random selector only",
            "wall_s": round(time.perf_counter() - t0, 1),
            "tokens": int(sum(len(x) for x in pool["input_ids"])),
        }
        write_json(work / "features.json", summary)
        return summary

    return cache.get_or_run("features", key, run)


def cmd_run(args) -> int:
    out = Path(args.out or REPO_ROOT / "outputs" / "noise_floor" / args.domain)
    cache = out / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for seed in args.seeds:
        ovr = overrides(args.domain, seed, cache, args.override)
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] features for seed {seed} (load {os.getloadavg()})")
        print("  ->", model_free_features(compose(ovr)), f"{time.time() - t0:.0f} s", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "grads.cli.main",
            *ovr,
            "stages=[select,finetune,evaluate]",
            f"hydra.run.dir={out}/runs/seed{seed}",
        ]
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {' '.join(cmd[3:])}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
        print(
            f"[{time.strftime('%H:%M:%S')}] seed {seed}: rc={rc} in {time.time() - t0:.0f} s "
            f"(load {os.getloadavg()})",
            flush=True,
        )
        if rc:
            return rc
    return 0


def cmd_analyse(args) -> int:
    from grads.report.collect import collect, read_items
    from grads.report.noise import noise_floor_report

    rows, missing = [], []
    if args.from_csv:  # the collector's CSV + <stem>_items.json.gz (scripts/make_tables.py)
        import pandas as pd

        csv = Path(args.from_csv)
        items = {
            str(r["job"]): r["items"]
            for r in read_items(csv.with_name(f"{csv.stem}_items.json.gz")) or []
        }
        rows = [
            {**r, "items": items.get(str(r["job"]))} for r in pd.read_csv(csv).to_dict("records")
        ]
    for d in args.runs:
        r, m = collect(d, keep_items=True)
        rows += r
        missing += m
    for m in missing:
        print(f"missing or failed job: {m}")
    text, table = noise_floor_report(rows, k_compare=args.k)
    print(text)
    if args.out:
        from grads.io import write_json, write_text

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_text(Path(args.out) / "noise_floor.md", text)
        write_json(Path(args.out) / "noise_floor.json", table)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fine-tune + evaluate random@5%% for each seed")
    r.add_argument("--domain", default="medical")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", default=None, help="default outputs/noise_floor/<domain>")
    r.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    a = sub.add_parser("analyse", help="noise-floor table from the runs' metrics.json")
    a.add_argument("runs", nargs="*", help="run folders (searched recursively)")
    a.add_argument("--from-csv", help="a collected results.csv (with its _items.json.gz) instead")
    a.add_argument("--k", type=int, default=3, help="seeds per method in the comparison (MDD)")
    a.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cmd_run(args) if args.cmd == "run" else cmd_analyse(args)
