"""Run a verdict: plan the jobs, estimate the cost, run them through the pipeline, judge, report.

Two phases of :func:`grads.pipeline.run` jobs, each in its own folder ``<run dir>/jobs/<job>/``:

1. **selection** (``stages=[warmup, features, select]``) of every compared selector and of the
   reference at the first seed: trains the warm-up and computes the features once, and gives each
   compared subset's size, so the reference runs at that size (at the composed budget when it
   resolves to the same size, else at a count budget);
2. **fine-tune + evaluate** every compared selector and the reference at every seed; the first
   three stages are cache hits (checked: ``cache`` in ``verdict.json``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from grads.io import write_json
from grads.verdict import analysis, cost, plan, summary
from grads.verdict.plan import ALL_STAGES, SELECT_STAGES, Job
from grads.verdict.settings import VerdictSettings, verdict_settings

log = logging.getLogger(__name__)

QUESTION = "Is the subset better than random on this pool?"


@contextlib.contextmanager
def job_dir(folder: Path) -> Iterator[None]:
    """Inside a Hydra app, point the run folder :func:`grads.pipeline.run` writes to at ``folder``
    for one job (each job keeps its own ``config_resolved.yaml`` and ``metrics.json``)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    if not HydraConfig.initialized():
        yield
        return
    runtime = HydraConfig.get().runtime
    old = runtime.output_dir
    with read_write(runtime):
        runtime.output_dir = str(folder)
    try:
        yield
    finally:
        with read_write(runtime):
            runtime.output_dir = old


def out_dir_of(base: dict) -> Path:
    """The verdict's folder: Hydra's run folder, else ``<output_dir>/verdict/<date>/<time>``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    return Path(base["paths"]["output_dir"]) / "verdict" / stamp


def run_job(job: Job, out_dir: Path, stages: list[str], name: str | None = None) -> dict:
    """One pipeline job in ``<out_dir>/jobs/<name>``; returns its metrics."""
    from grads.pipeline import run

    cfg = copy.deepcopy(job.cfg)
    cfg["stages"] = list(stages)
    folder = out_dir / "jobs" / (name or job.name)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"verdict: job {folder.name} ({', '.join(stages)})", flush=True)
    with job_dir(folder):
        metrics = run(cfg)
    if not (folder / "metrics.json").exists():  # outside Hydra the pipeline picks its own folder
        write_json(folder / "metrics.json", metrics)
    return metrics | {"run_dir": str(folder)}


def selection_phase(base, nodes, ref_node, seed, out_dir) -> tuple[dict, int | None, list]:
    """Phase 1: ``({label: subset size}, the reference's size at the composed budget, metrics)``."""
    from grads.selectors.budget import parse_budget

    sizes, runs = {}, []
    for node in nodes:
        job = plan.make_job(base, node, seed, "compared")
        m = run_job(job, out_dir, SELECT_STAGES, f"select-{job.label}")
        sizes[job.label] = int(m["n_selected"])
        runs.append(m)
    ref_size = None
    if not parse_budget(base["budget"]).is_auto:
        job = plan.make_job(base, ref_node, seed, "reference")
        m = run_job(job, out_dir, SELECT_STAGES, f"select-{job.label}")
        ref_size = int(m["n_selected"])
        runs.append(m)
    return sizes, ref_size, runs


def reference_jobs(base, ref_node, seeds, sizes: dict, ref_size: int | None) -> list[Job]:
    """The reference at every compared size and seed (the composed budget where it gives that
    size, else exactly that many samples)."""
    jobs = []
    for n in sorted(set(sizes.values())):
        budget = None if n == ref_size else plan.count_budget(n)
        jobs += [plan.make_job(base, ref_node, s, "reference", budget, size=n) for s in seeds]
    return jobs


def run_verdict(cfg) -> dict:
    """The verdict for a composed config (see :mod:`grads.verdict`); returns ``verdict.json``.

    Raises:
        grads.config.ConfigError: a bad ``verdict.*`` or pipeline key, before anything runs.
    """
    t0 = time.time()
    s = verdict_settings(cfg)
    base, nodes, ref_node, info = plan.prepare_base(cfg, s)
    out_dir = out_dir_of(base)
    seeds = s.seed_list(base["seed"])
    compared = [plan.make_job(base, node, seed, "compared") for node in nodes for seed in seeds]
    guess = [plan.make_job(base, ref_node, seed, "reference") for seed in seeds]
    profile = cost.pool_profile(base)
    rates = cost.rates_for(base, s.tok_s)
    tokens = cost.token_plan(base, compared + guess, profile, info)
    estimate = {"plan": tokens, "rates": rates, "seconds": cost.seconds(tokens, rates)}
    print(cost.describe(tokens, rates, profile, _title(base, s, nodes, seeds)), flush=True)
    if s.dry_run:
        return {"estimate": estimate, "jobs": [j.name for j in compared + guess], "info": info}

    sizes, ref_size, select_runs = selection_phase(base, nodes, ref_node, seeds[0], out_dir)
    refs = reference_jobs(base, ref_node, seeds, sizes, ref_size)
    for job in compared:
        job.size = sizes[job.label]
    rates2 = cost.refine_rates(rates, select_runs)
    left = cost.token_plan(base, compared + refs, profile, info)
    print(cost.describe(left, rates2, title="verdict: fine-tunes and evaluations left"), flush=True)

    estimate["after_selection"] = {
        "plan": left,
        "rates": rates2,
        "seconds": cost.seconds(left, rates2),
    }

    results = [(job, run_job(job, out_dir, ALL_STAGES)) for job in compared + refs]
    report = _report(base, s, info, seeds, results, out_dir)
    report["cost"] = {
        "estimate": estimate,
        "measured": cost.measured(select_runs + [m for _, m in results], time.time() - t0),
    }
    return summary.finish(report, base, s, results, out_dir)


def _title(base: dict, s: VerdictSettings, nodes: list[dict], seeds: list[int]) -> str:
    names = ", ".join(n.get("name", "?") for n in nodes)
    n_jobs = (len(nodes) + 1) * len(seeds)
    return (
        f"verdict: {names} vs {s.against} on {base['domain']['name']} "
        f"({base['model']['name']}, budget {base['budget'].get('name')}, seeds {seeds}): "
        f"{n_jobs} fine-tunes and evaluations; estimated cost"
    )


def _report(base, s, info, seeds, results: list[tuple[Job, dict]], out_dir: Path) -> dict:
    """``verdict.json`` without its cost: the judged comparisons, the jobs and the cache check."""
    compared: dict[str, dict] = {}
    references: dict[int, dict] = {}
    for job, m in results:
        items = analysis.job_items(m)
        if job.role == "compared":
            entry = compared.setdefault(job.label, {"n": int(m["n_selected"]), "runs": {}})
        else:
            entry = references.setdefault(job.size, {"label": job.label, "n": job.size, "runs": {}})
        entry["runs"][job.seed] = items
    judged = analysis.assemble(compared, references, s.against, s.n_boot)
    # phase 1 trained the warm-up and computed the features: every job here must read them
    shared = sum({"warmup", "features"} <= set(m.get("cache_hits") or []) for _, m in results)
    return {
        "question": QUESTION.replace("random", s.against),
        "domain": base["domain"]["name"],
        "model": base["model"]["name"],
        "budget": base["budget"].get("name"),
        "against": s.against,
        "seeds": seeds,
        "heldout": info["heldout"],
        "eval": info["eval"],
        **judged,
        "summary": [row["verdict"] for row in judged["selectors"]],
        "cache": {
            "jobs": len(results),
            "warmup_and_features_from_cache": int(shared),
            "all_shared": shared == len(results),
        },
        "jobs": [_job_row(job, m) for job, m in results],
        "run_dir": str(out_dir),
    }


def _job_row(job: Job, m: dict) -> dict:
    return {
        "name": job.name,
        "selector": job.label,
        "role": job.role,
        "seed": job.seed,
        "n_selected": m.get("n_selected"),
        "run_dir": m.get("run_dir"),
        "select_dir": (m.get("artefacts") or {}).get("select"),
        "cache_hits": m.get("cache_hits"),
        "domain_bpb": m.get("domain_bpb"),
        "general_kl": m.get("general_kl"),
    }
