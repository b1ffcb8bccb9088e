"""What choosing a GrADS subset costs, next to a full fine-tune, for three variants in one run.

Variants, all on the same real pool, model and trainer (``grads.pipeline.run`` with stages
``[warmup, features, select]`` in a fresh stage cache, so nothing is reused between them):

* ``a_pass``:     one warm-up epoch over the pool, then the separate features pass (the paper).
* ``b_subset``:   one warm-up epoch over a seeded 5% of the pool (``warmup.fraction=0.05``, as LESS
  does), then the pass over the whole pool.
* ``c_recorded``: one warm-up epoch over the pool that records the features from its own steps
  (``features.source=warmup``): no separate pass.
* ``a_pass_seed1``: ``a_pass`` with another warm-up seed: the agreement a variant can be expected
  to reach with ``a_pass`` at all (the noise floor of the signal).

Selection cost = the warm-up + features + select stages (model loading and export included), as
wall time and as CPU time (this process and its children, all threads: on a shared machine the
wall time follows the neighbours' load, CPU time far less). Full fine-tune cost = 3 x the 1-epoch
training loop of ``a_pass`` (same pool, same trainer): conservative, as it leaves out the
fine-tune's own model loading and export;
``--measure-finetune`` runs the real 3-epoch fine-tune instead. Agreement between variants:
Spearman correlation of the GrADS signal ``s_i`` (log, IQR-standardised, equal weights over the
selector's columns) and the overlap of the 5% selections.

Throughput: the trainer's fixed ``8 x 128`` DeepSpeed step (``bench_train.deepspeed_step_throughput``,
same model and mode) is timed before and after the variants; the pipeline warm-ups' tokens/s
(real tokens / training-loop time, padding and checkpoints included) are reported against the mean.
The machine's load average is printed with every phase: on a shared machine only the ratios mean
something. ``--tune`` instead times short warm-ups over micro-batch sizes, length grouping and
checkpointing, to choose the CPU defaults.

Usage::

    GRADS_MODEL_DIR=/work/models nice -n 10 python scripts/bench_cost.py --domain legal --pool 300
    GRADS_MODEL_DIR=/work/models nice -n 10 python scripts/bench_cost.py --tune --pool 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Before torch loads libgomp: threads that wait at a barrier sleep instead of spinning. On a
# shared, oversubscribed CPU the default spin made the same training step 4-10x slower in wall
# time and inflated its CPU time as much (measured in bench_cost's notes); idle, it costs ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Large tensors straight from mmap and back to the OS when freed: glibc's adaptive threshold let
# RSS stay at the largest step's high-water mark (7.9 vs 6.3 GB peak over 10 SmolLM2 steps here).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")
sys.path.insert(0, str(ROOT / "scripts"))

VARIANTS = {
    "a_pass": ["features.source=pass"],
    "b_subset": ["features.source=pass", "warmup.fraction=0.05"],
    "c_recorded": ["features.source=warmup"],
    # Noise floor: a_pass again with another warm-up seed (another batch order and LoRA init).
    "a_pass_seed1": ["features.source=pass", "warmup.seed=1"],
}


def compose(overrides: list[str]) -> dict:
    """The resolved pipeline config for ``overrides`` (plain dict, absolute paths)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["paths"] = {k: str(Path(v).resolve()) for k, v in resolved["paths"].items()}
    return resolved


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def fixed_step(args, label: str) -> dict:
    from bench_train import deepspeed_step_throughput

    from grads.models import model_config

    r = deepspeed_step_throughput(
        model_config("smollm2_135m"),
        args.mode,
        batch=8,
        seq=128,
        steps=args.step_reps,
        cache_dir=os.environ.get("GRADS_MODEL_DIR"),
    )
    print(
        f"[{label}] fixed 8x128 DeepSpeed step ({args.mode}): {r['tokens_per_s']:.1f} tokens/s "
        f"(median {r['median_tokens_per_s']:.1f}), {r['tokens_per_cpu_s']:.1f} tokens/CPU-s; "
        f"load {load()}",
        flush=True,
    )
    return r


def base_overrides(args, out: Path) -> list[str]:
    return [
        f"paths.root_dir={ROOT}",  # the data path is relative to it; we chdir into `out`
        f"domain={args.domain}",
        f"domain.pool_limit={args.pool}",
        f"data.max_seq_len={args.max_seq_len}",
        "model=smollm2_135m",
        "logger=none",
        "selector=grads",
        "budget=p5",
        f"trainer.mode={args.mode}",
        f"paths.output_dir={out}",
        f"paths.cache_dir={out / 'cache'}",
        *args.override,
    ]


def cpu_now() -> float:
    """CPU seconds used so far by this process and its finished children (all threads)."""
    import resource

    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_variant(name: str, args, out: Path) -> dict:
    """The pipeline's warm-up, features and select stages of one variant, one stage per call.

    One stage per ``grads.pipeline.run`` call (the earlier ones are cache hits) so that each
    stage's CPU time is measured too: on a shared machine wall time follows the neighbours' load.
    """
    from grads.io import read_json
    from grads.pipeline import run

    cpu, m = {}, None
    t0 = time.perf_counter()
    for stages in (["warmup"], ["warmup", "features"], ["warmup", "features", "select"]):
        cfg = compose(base_overrides(args, out) + VARIANTS[name] + [f"stages=[{','.join(stages)}]"])
        c0 = cpu_now()
        m = run(cfg)
        cpu[stages[-1]] = cpu_now() - c0
    wall = time.perf_counter() - t0
    art = {k: Path(v) for k, v in m["artefacts"].items()}
    warm = read_json(art["warmup"] / "train_summary.json")
    feats = read_json(art["features"] / "features.json")
    res = {
        "variant": name,
        "stage_s": {s: c["wall_s"] for s, c in m["cost"].items()},
        "stage_cpu_s": cpu,
        "selection_cost_s": m["selection_cost_s"],
        "selection_cpu_s": sum(cpu.values()),
        "run_s": wall,
        "warmup_samples": warm["num_samples"],
        "warmup_loop_s": warm["wall_time_s"],
        "warmup_loop_cpu_s": warm["loop_cpu_s"],
        "warmup_tokens": warm["tokens"],
        "warmup_tokens_per_s": warm["tokens_per_s"],
        "warmup_tokens_per_cpu_s": warm["tokens"] / warm["loop_cpu_s"],
        "padding_efficiency": warm.get("padding_efficiency"),
        "features_computed": feats.get("n_computed", feats.get("n_samples")),
        "features_tokens_per_s": feats.get("tokens_per_s"),
        "features_path": str(art["features"] / "features.parquet"),
        "selection_path": str(art["select"] / "selection.jsonl"),
        "load_after": load(),
    }
    print(f"[{name}] {json.dumps({k: v for k, v in res.items() if 'path' not in k})}", flush=True)
    return res


def signal(path: str, cfg: dict):
    """GrADS signal s_i per id (the selector's transform and scale, equal column weights)."""
    import numpy as np
    import pandas as pd
    from hydra.utils import instantiate

    from grads.selectors.grads_kde import gradient_signal

    sel = instantiate(cfg["selector"])
    cols = list(sel.columns)
    table = pd.read_parquet(path, columns=["id", *cols])
    ok = np.all([np.isfinite(table[c]) & (table[c] > 0) for c in cols], axis=0)
    table = table[ok]
    s, _ = gradient_signal(
        {c: table[c].to_numpy(np.float64) for c in cols},
        {c: 1.0 for c in cols},
        sel.transform,
        sel.scale,
    )
    return pd.Series(s, index=table["id"].to_numpy())


def spearman(a, b) -> float:
    common = a.index.intersection(b.index)
    ra, rb = a[common].rank(), b[common].rank()
    return float(ra.corr(rb))


def agreement(results: list[dict], cfg: dict) -> list[dict]:
    """Spearman of the GrADS signal and overlap of the 5% (pipeline) and 25% selections, per pair."""
    import pandas as pd
    from hydra.utils import instantiate

    from grads.io import read_jsonl

    sig = {r["variant"]: signal(r["features_path"], cfg) for r in results}
    sel = {r["variant"]: {x["id"] for x in read_jsonl(r["selection_path"])} for r in results}
    selector = instantiate(cfg["selector"])
    p25 = {
        r["variant"]: set(selector.select(pd.read_parquet(r["features_path"]), "p25", 0).ids)
        for r in results
    }
    rows = []
    names = [r["variant"] for r in results]
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            rows.append(
                {
                    "pair": f"{x} vs {y}",
                    "spearman_signal": spearman(sig[x], sig[y]),
                    "overlap_p5": len(sel[x] & sel[y]) / max(1, len(sel[x])),
                    "n_selected": len(sel[x]),
                    "overlap_p25": len(p25[x] & p25[y]) / max(1, len(p25[x])),
                    "n_p25": len(p25[x]),
                }
            )
    return rows


def measure_finetune(args, out: Path) -> dict:
    """A real 3-epoch fine-tune on the whole pool: its training loop's wall and CPU time."""
    from grads.training import train

    summary = train(compose(base_overrides(args, out)), "finetune", str(out / "finetune_full"))
    return {
        "wall_s": float(summary["wall_time_s"]),
        "cpu_s": float(summary["loop_cpu_s"]),
        "how": "measured: 3-epoch fine-tune training loop",
    }


def report(results: list[dict], agree: list[dict], ft: dict, steps: list[dict]) -> str:
    """Markdown: cost per variant (wall and CPU time), throughput, agreement between variants."""
    ref = sum(r["tokens_per_s"] for r in steps) / len(steps)
    ref_cpu = sum(r["tokens_per_cpu_s"] for r in steps) / len(steps)
    lines = [
        "| variant | warm-up samples | warm-up / features / select, wall s | selection cost, wall s "
        "| ÷ full FT (wall) | selection CPU s | ÷ full FT (CPU) | warm-up tok/s (÷ fixed step) "
        "| warm-up tok/CPU-s (÷ fixed step) | padding eff. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        st = r["stage_s"]
        lines.append(
            f"| {r['variant']} | {r['warmup_samples']} "
            f"| {st.get('warmup', 0):.0f} / {st.get('features', 0):.0f} / {st.get('select', 0):.1f} "
            f"| {r['selection_cost_s']:.0f} | **{r['selection_cost_s'] / ft['wall_s']:.3f}** "
            f"| {r['selection_cpu_s']:.0f} | **{r['selection_cpu_s'] / ft['cpu_s']:.3f}** "
            f"| {r['warmup_tokens_per_s']:.0f} ({r['warmup_tokens_per_s'] / ref:.2f}) "
            f"| {r['warmup_tokens_per_cpu_s']:.0f} ({r['warmup_tokens_per_cpu_s'] / ref_cpu:.2f}) "
            f"| {r['padding_efficiency']:.3f} |"
        )
    lines += [
        "",
        f"Full fine-tune cost: {ft['wall_s']:.0f} s wall, {ft['cpu_s']:.0f} CPU s ({ft['how']}). "
        "Fixed 8x128 DeepSpeed step: "
        + ", ".join(f"{r['tokens_per_s']:.0f}" for r in steps)
        + f" tokens/s (mean {ref:.0f}); "
        + ", ".join(f"{r['tokens_per_cpu_s']:.0f}" for r in steps)
        + f" tokens/CPU-s (mean {ref_cpu:.0f}).",
        "",
        "| pair | Spearman (GrADS signal) | overlap of 5% selections | overlap of 25% |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {a['pair']} | {a['spearman_signal']:.3f} | {a['overlap_p5']:.2f} "
        f"(of {a['n_selected']}) | {a['overlap_p25']:.2f} (of {a['n_p25']}) |"
        for a in agree
    ]
    return "\n".join(lines)


def tune(args, out: Path) -> None:
    """Choose the CPU trainer defaults: padding efficiency x step throughput, and checkpoint cost.

    Padding efficiency (real / padded tokens) of one epoch's batch plan is exact, computed from the
    pool's lengths for each micro-batch size, with and without length grouping. The DeepSpeed step's
    tokens/s is timed on fixed batches of that size at the pool's mean length (interleaved sizes,
    so load hits all alike), and one LoRA checkpoint save is timed. Real tokens/s of the warm-up
    is then about step tokens/s x padding efficiency; the main run measures the chosen default.
    """
    from grads.data.pool import load_pool
    from grads.models import load_model
    from grads.training import BatchPlan

    cfg = compose(base_overrides(args, out))
    _, tok = load_model(cfg["model"], cache_dir=cfg["paths"]["model_dir"])
    pool = load_pool(cfg, tok)
    lens = [len(x) for x in pool["input_ids"]]
    mean = round(sum(lens) / len(lens))
    print(
        f"pool {len(pool)} samples; tokens: median {sorted(lens)[len(lens) // 2]}, "
        f"max {max(lens)}, mean {mean}; load {load()}",
        flush=True,
    )
    sizes = (4, 8, 16)
    eff = {}
    for mb in sizes:
        for grouped in (False, True):
            plan = BatchPlan(len(lens), mb, 1, 1, 0, lengths=lens if grouped else None)
            batches = plan.epoch_batches(0)
            eff[mb, grouped] = sum(lens) / sum(plan.padded_tokens(b, lens) for b in batches)
    from bench_train import deepspeed_step_throughput

    from grads.models import model_config

    tps: dict[int, list[float]] = {mb: [] for mb in sizes}
    save_s = None
    for rep in range(args.tune_reps):
        for mb in sizes:
            r = deepspeed_step_throughput(
                model_config("smollm2_135m"),
                args.mode,
                batch=mb,
                seq=mean,
                steps=2,
                cache_dir=os.environ.get("GRADS_MODEL_DIR"),
                save_to=str(out / "ckpt") if (rep == 0 and mb == 8) else None,
            )
            tps[mb].append(r["tokens_per_cpu_s"])
            save_s = r["save_s"] if r["save_s"] is not None else save_s
            print(
                f"rep {rep} batch {mb}x{mean}: {r['tokens_per_s']:.1f} tokens/s, "
                f"{r['tokens_per_cpu_s']:.1f} tokens/CPU-s; load {load()}",
                flush=True,
            )
    print(f"\nLoRA checkpoint save: {save_s:.2f} s")
    print(
        "\n| micro-batch | step tokens/CPU-s | padding eff. random | padding eff. grouped "
        "| est. real tokens/CPU-s random | est. real tokens/CPU-s grouped |"
    )
    print("|---|---|---|---|---|---|")
    for mb in sizes:
        t = sum(tps[mb]) / len(tps[mb])
        print(
            f"| {mb} | {t:.0f} | {eff[mb, False]:.3f} | {eff[mb, True]:.3f} "
            f"| {t * eff[mb, False]:.0f} | {t * eff[mb, True]:.0f} |"
        )


def in_child(args, out: Path, job: str) -> dict:
    """Run one job (``step:<label>`` or a variant) in a fresh process; return its result.

    One process per job keeps memory at one model's worth (the machine is shared; a single
    process holding every variant's models was OOM-killed) and makes each job's CPU time its own.
    """
    import subprocess

    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--out", str(out)]
    argv += [f"--domain={args.domain}", f"--pool={args.pool}", f"--max-seq-len={args.max_seq_len}"]
    argv += [f"--mode={args.mode}", f"--step-reps={args.step_reps}", *args.override]
    subprocess.run(argv, check=True, cwd=out)
    with open(out / f"job_{job.replace(':', '_')}.json") as f:
        return json.load(f)


def worker(args) -> None:
    """Child side of ``in_child``: ``args.out`` is the run folder itself."""
    out = Path(args.out)
    os.chdir(out)
    job = args.worker
    if job.startswith("step:"):
        res = fixed_step(args, job.split(":", 1)[1])
        res = {k: v for k, v in res.items() if k != "step_s"}
    else:
        res = run_variant(job, args, out)
    with open(out / f"job_{job.replace(':', '_')}.json", "w") as f:
        json.dump(res, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domain", default="legal")
    parser.add_argument("--pool", type=int, default=300, help="domain.pool_limit")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_cost"))
    parser.add_argument("--step-reps", type=int, default=4, help="timed fixed steps per check")
    parser.add_argument("--measure-finetune", action="store_true")
    parser.add_argument("--tune", action="store_true", help="choose CPU defaults instead")
    parser.add_argument("--tune-reps", type=int, default=1, help="--tune: rounds over sizes")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one job, in a child
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for every variant")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.worker:
        worker(args)
        return
    out = Path(args.out).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # grads.pipeline.run writes outputs/runs/<time> under the working directory
    print(f"out {out}; cpus {os.cpu_count()}; load {load()}", flush=True)
    if args.tune:
        tune(args, out)
        return
    steps = [in_child(args, out, "step:before")]
    results = [in_child(args, out, v) for v in args.variants]
    steps.append(in_child(args, out, "step:after"))
    if args.measure_finetune:
        ft = measure_finetune(args, out)
    else:
        a = next(r for r in results if r["variant"] == "a_pass")
        ft = {
            "wall_s": 3 * a["warmup_loop_s"],
            "cpu_s": 3 * a["warmup_loop_cpu_s"],
            "how": "3 x the 1-epoch training loop of a_pass",
        }
    agree = agreement(results, compose(base_overrides(args, out)))
    table = report(results, agree, ft, steps)
    print("\n" + table + f"\n\nload average at the end: {load()}")
    with open(out / "bench_cost.json", "w") as f:
        json.dump(
            {
                "args": vars(args),
                "results": results,
                "agreement": agree,
                "finetune": ft,
                "fixed_step": steps,
            },
            f,
            indent=2,
        )
    (out / "bench_cost.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
