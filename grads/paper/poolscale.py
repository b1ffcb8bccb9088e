"""The paper's question at ten times the pool: the whole financial pool and a data-efficiency curve.

The same protocol as ``experiment=paper_main`` (SmolLM2-135M-Instruct, LoRA, 3 fine-tune epochs,
held-out bits per byte and KL, paired CIs) on the whole financial pool (``domain.pool_limit=null``:
10,617 samples after decontamination, dedup and the held-out split) instead of a 1,000-sample draw.
Every arm trains under bf16 autocast (``trainer.autocast=true``, 1.67x on this CPU's training step)
to make the compute affordable; the ``bridge`` phase runs ``random`` and ``grads`` at 5 % on the
1,000-sample pool under the same precision, so the two pool sizes stay comparable.

Phases, in order, each one ``grads -m`` sweep (the first computes the warm-up and the features, every
later one reads them from the stage cache):

* ``features``  warm-up and features on the whole pool (no selection, no fine-tune).
* ``main_p5``   5 %, seed 0: ``random``, ``grads``, ``grads_paper`` and the baseline that did best on
                the financial 1,000-sample pool (``results/tables/financial/plan.json``).
* ``full``      the whole pool, 3 epochs.
* ``seeds_p5``  seeds 1 and 2 at 5 % for ``random``, ``grads`` and ``grads_paper``.
* ``curve``     budgets 1 %, 10 % and 25 % for ``random`` and ``grads`` (seed 0); 5 % and ``full``
                come from above.
* ``bridge``    ``random`` and ``grads`` at 5 % on the 1,000-sample pool, bf16 autocast (its own
                warm-up and features: the precision enters their keys).
* ``stability`` selection only under a second warm-up seed (``warmup.seed=1``) for ``grads``,
                ``grads_paper`` and the strongest baseline at 5 %, on the whole pool (bf16, this
                experiment's precision) and on the 1,000-sample pool (float32, the committed
                tables' precision): the overlap with the seed-0 subsets says how much of a
                selection survives another warm-up.

    python scripts/run_poolscale.py                       # every phase, in order
    python scripts/run_poolscale.py --phases features     # one phase
    python scripts/run_poolscale.py --dry-run             # print the commands
    python scripts/run_poolscale.py --collect-only        # re-collect what has finished
    python scripts/run_poolscale.py --status              # which jobs are done, started, pending

Runs go to ``outputs/tables/financial_pool/<phase>``; the collector writes
``results/poolscale/financial_pool/`` (phases ``main_p5`` … ``curve``) and
``results/poolscale/financial_bridge/`` (the bridge), each with its own paired tables; outside
``results/tables/``, so that the three domains' merged tables stay those of the 1,000-sample pools.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from grads.constants import REPO_ROOT, conf_dir
from grads.io import read_json
from grads.paper.poolscale_views import DOMAIN, JOB_STAGES

WHOLE = ["experiment=paper_main", f"domain={DOMAIN}", "domain.pool_limit=null",
         "trainer.autocast=true", "group=paper_poolscale"]  # fmt: skip
BRIDGE = ["experiment=paper_main", f"domain={DOMAIN}", "domain.pool_limit=1000",
          "trainer.autocast=true", "group=paper_poolscale"]  # fmt: skip
PAPER_1K = ["experiment=paper_main", f"domain={DOMAIN}", "group=paper_poolscale"]
PHASES = ["features", "main_p5", "full", "seeds_p5", "curve", "bridge", "stability"]
CURVE_BUDGETS = ("p1", "p10", "p25")
# where each phase's runs are collected: the whole pool, or the 1,000-sample pool under bf16
COLLECTION = {"bridge": "financial_bridge"}
STABILITY_PARTS = {"stability_whole": WHOLE, "stability_1k": PAPER_1K}


def strongest_baseline(plan_file: Path | None = None) -> str:
    """The baseline with the lowest held-out bpb on the financial 1,000-sample pool at 5 %."""
    plan_file = plan_file or REPO_ROOT / "results" / "tables" / DOMAIN / "plan.json"
    if not plan_file.is_file():
        raise SystemExit(f"{plan_file} is missing: run scripts/run_tables.py {DOMAIN} first")
    return read_json(plan_file)["strongest"][0]


def own_features(selectors: list[str]) -> list[str]:
    """Overrides that compute only the features ``selectors`` read: their representation passes,
    and IFD only if one of them needs it (``paper_main`` computes every selector's)."""
    from omegaconf import OmegaConf

    from grads.verdict.plan import share_features

    base: dict = {"features": {"ifd": "auto", "representations": "auto"}}
    share_features(base, [OmegaConf.load(conf_dir() / "selector" / f"{s}.yaml") for s in selectors])
    feats = base["features"]
    passes = feats["representations"] if isinstance(feats["representations"], list) else []
    return [
        f"features.ifd={str(feats['ifd']).lower()}",
        f"features.representations=[{','.join(passes)}]",
    ]


def expand(phases: list[str]) -> list[str]:
    """The sweeps of ``phases`` in order (``stability`` is one sweep per pool size)."""
    return [p for ph in phases for p in (list(STABILITY_PARTS) if ph == "stability" else [ph])]


def phase_overrides(phase: str, baseline: str, budgets: Sequence[str] = CURVE_BUDGETS) -> list[str]:
    """The ``grads -m`` overrides of one phase (``baseline``: the strongest at 1,000; ``budgets``:
    the curve's)."""
    per_job = (
        "hydra.sweep.subdir=${selector.name}_${budget.name}_seed${seed}"  # reruns overwrite nothing
    )
    if phase == "features":
        return [*WHOLE, "selector=random", "budget=p5", "seed=0", "stages=[warmup,features]"]
    if phase == "main_p5":
        sels = ["random", "grads", "grads_paper", baseline]
        return [*WHOLE, "budget=p5", "seed=0", f"selector={','.join(sels)}", per_job]
    if phase == "full":
        return [*WHOLE, "budget=p5", "seed=0", "selector=full", per_job]
    if phase == "seeds_p5":
        return [*WHOLE, "budget=p5", "seed=1,2", "selector=random,grads,grads_paper", per_job]
    if phase == "curve":
        return [*WHOLE, f"budget={','.join(budgets)}", "seed=0", "selector=random,grads", per_job]
    if phase == "bridge":
        return [*BRIDGE, "budget=p5", "seed=0", "selector=random,grads", per_job]
    if phase in STABILITY_PARTS:
        sels = ["grads", "grads_paper", baseline]
        # the whole pool computes only the features these selectors read (paper_main's RDS+ pass
        # and IFD: ~35 min there); the 1,000 part keeps the keys its finished selections ran on
        own = own_features(sels) if phase == "stability_whole" else []
        return [*STABILITY_PARTS[phase], "budget=p5", "seed=0", "warmup.seed=1",
                f"selector={','.join(sels)}", *own, "stages=[warmup,features,select]", per_job]  # fmt: skip
    raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")


def commands(
    phase: str, baseline: str, runs_dir: Path, overrides: list[str] = ()
) -> list[list[str]]:
    """The command lines of one phase, run in this order. The curve runs one budget at a time so
    that random's and ``grads``' cells of a budget land together (within one sweep the sweeper
    varies the budget fastest: ``paper_main`` lists its selectors first)."""
    sweeps = [(b,) for b in CURVE_BUDGETS] if phase == "curve" else [CURVE_BUDGETS]
    return [[sys.executable, "-m", "grads.cli.main", "-m", *phase_overrides(phase, baseline, b),
             f"hydra.sweep.dir={runs_dir / phase}", *overrides] for b in sweeps]  # fmt: skip


def job_names(phase: str, baseline: str) -> list[str]:
    """The job folders of one phase's sweep (``hydra.sweep.subdir``; ``0`` for ``features``)."""
    if phase == "features":
        return ["0"]
    axes = dict(o.split("=", 1) for o in phase_overrides(phase, baseline) if "=" in o)
    return [f"{sel}_{budget}_seed{seed}" for sel in axes["selector"].split(",")
            for budget in axes["budget"].split(",") for seed in axes["seed"].split(",")]  # fmt: skip


def status(runs_dir: Path, baseline: str, phases: list[str] = PHASES) -> list[dict]:
    """Each job of ``phases``: ``done`` (its ``metrics.json`` is written; ``computed_min``: the
    minutes of its own stages, ``JOB_STAGES``, even when a rerun of the sweep read them back from
    the cache, plus the shared stages it computed rather than read), ``started`` (its folder
    exists: running, or stopped and resumable) or ``pending``."""
    out = []
    for phase in expand(phases):
        for job in job_names(phase, baseline):
            folder = runs_dir / phase / job
            row = {"phase": phase, "job": job, "state": "pending", "computed_min": None}
            if (folder / "metrics.json").is_file():
                cost = read_json(folder / "metrics.json").get("cost") or {}
                computed = [c.get("wall_s") or 0.0 for stage, c in cost.items()
                            if stage in JOB_STAGES or not c.get("cached")]  # fmt: skip
                row.update(state="done", computed_min=round(sum(computed) / 60, 1))
            elif folder.is_dir():
                row["state"] = "started"
            out.append(row)
    return out


def print_status(rows: list[dict]) -> None:
    """The status table, then per phase: done / total jobs and the hours its done jobs computed."""
    print(f"{'phase':<16} {'job':<26} {'state':<8} computed")
    for r in rows:
        minutes = f"{r['computed_min']:.1f} min" if r["computed_min"] is not None else ""
        print(f"{r['phase']:<16} {r['job']:<26} {r['state']:<8} {minutes}")
    parts = []
    for phase in dict.fromkeys(r["phase"] for r in rows):
        mine = [r for r in rows if r["phase"] == phase]
        done = [r for r in mine if r["state"] == "done"]
        hours = sum(r["computed_min"] for r in done) / 60
        parts.append(f"{phase} {len(done)}/{len(mine)}" + (f" ({hours:.1f} h)" if done else ""))
    print("done: " + ", ".join(parts))


def collect(runs_dir: Path, results_root: Path, results_md: Path | None = None) -> None:
    """Tables, per-item results and selected ids of the finished runs, one folder per collection;
    the selection-stability summary when both warm-up seeds have selected; the comparison with
    the 1,000-sample pool (``pool_size.md``, from the CSVs under ``results_root``'s parent); the
    links in ``results_md`` (default: RESULTS.md when ``results_root`` is the repository's)."""
    from grads.paper.poolscale_views import collect_runs, pool_size_report, stability_report
    from grads.paper.results_md import update_results_md

    groups: dict[str, list[Path]] = {}
    for phase in expand(PHASES):
        if phase == "features" or phase in STABILITY_PARTS or not (runs_dir / phase).is_dir():
            continue
        groups.setdefault(COLLECTION.get(phase, f"{DOMAIN}_pool"), []).append(runs_dir / phase)
    for title, dirs in groups.items():
        collect_runs(dirs, results_root / title, title)
    stability_report(runs_dir, results_root)
    pool_size_report(results_root.parent)
    if results_md is None and results_root == REPO_ROOT / "results" / "poolscale":
        results_md = REPO_ROOT / "RESULTS.md"
    for title in ("financial_bridge", f"{DOMAIN}_pool"):
        folder = results_root / title
        if results_md and (folder / f"{title}.md").is_file():
            update_results_md(results_md, title, folder, views="Views")


def run(phases: list[str], runs_dir: Path, results_root: Path, dry_run: bool, overrides) -> None:
    """Run ``phases`` in order, collecting after each; stops at a phase with failed jobs."""
    baseline = strongest_baseline()
    for phase in expand(phases):
        t0, rc = time.time(), 0
        for cmd in commands(phase, baseline, runs_dir, overrides):
            print(f"== {phase}: {shlex.join(cmd[2:])}", flush=True)
            if not dry_run:
                rc = subprocess.run(cmd).returncode or rc
        if dry_run:
            continue
        minutes = (time.time() - t0) / 60
        print(f"== {phase} {'done' if rc == 0 else f'FAILED (exit {rc})'} in {minutes:.1f} min")
        collect(runs_dir, results_root)
        if rc != 0:
            raise SystemExit(f"phase {phase} had failed jobs; fix and rerun (the cache resumes)")


def main(argv: list[str] | None = None) -> None:
    """``scripts/run_poolscale.py``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", nargs="+", default=PHASES, metavar="PHASE", help=f"of {PHASES}")
    ap.add_argument(
        "--runs-dir", default=None, help="default: <repo>/outputs/tables/financial_pool"
    )
    ap.add_argument("--results-root", default=None, help="default: <repo>/results/poolscale")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--status", action="store_true", help="which jobs are done, started, pending")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every phase (key=value)")
    args = ap.parse_args(argv)
    # overrides may follow the phases (--phases features features.chunk_size=1024)
    args.overrides += [p for p in args.phases if "=" in p]
    args.phases = [p for p in args.phases if "=" not in p]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown or not args.phases:
        ap.error(f"--phases {unknown or '(none)'}: choose from {PHASES}")
    runs_dir = Path(args.runs_dir or REPO_ROOT / "outputs" / "tables" / f"{DOMAIN}_pool").resolve()
    results_root = Path(args.results_root or REPO_ROOT / "results" / "poolscale").resolve()
    if args.status:
        print_status(status(runs_dir, strongest_baseline(), args.phases))
        return
    if args.collect_only:
        collect(runs_dir, results_root)
        return
    run(args.phases, runs_dir, results_root, args.dry_run, args.overrides)
