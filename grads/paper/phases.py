"""Run the real-domain tables (RESULTS.md, "Protocol") for one domain, phase by phase.

Phases, in the order the compute is spent (each is one ``grads -m`` sweep; the warm-up and features
of the domain are computed once, by the first job, and shared by every later job through the cache):

* ``main_p5``   Table 1 at 5 %, seed 0: every selector of ``experiment=paper_main`` (``full`` included),
                in that file's order (:func:`grads.paper.protocol.main_selectors`).
* ``seeds_p5``  seeds 1 and 2 at 5 % for ``random``, ``grads``, ``grads_paper`` and the two strongest
                baselines.
* ``main_p50``  Table 1 at 50 %, seed 0: ``random``, ``grads``, ``grads_paper`` and the strongest
                baseline.
* ``ablation``  Table 2: ``experiment=paper_ablation`` (GrADS rule x gradient source) at 5 %, seed 0,
                as one sweep per source; the default rule with both sources is main_p5's ``grads``
                run (the same selection), not trained again.
* ``ablation_seeds``  seeds 1 and 2 for the best Table 2 cell other than the default (lowest held-out
                bpb at seed 0), so the rule that may replace the default does not rest on one seed
                (the default with both sources is ``grads``, which ``seeds_p5`` already ran on 3 seeds).
* ``leader_seeds``  seeds 1 and 2 for the Table 2 cell that leads across domains (mean rank over
                this domain's grid and the collected CSVs of the other domains beside
                ``<results>``): the cell the default decision pairs with the default
                (:func:`grads.paper.decisions.default_decision`), so that it rests on 3 seeds in every domain.
                Only the seeds it lacks here; rerun once more domains are in (a new leader gets its
                own folder under ``leader_seeds/``).
* ``default_p50``  the ``grads`` default at 50 % again, when it changed (Table 2's decision) after
                ``main_p50`` ran the old one; nothing otherwise.
* ``balanced``  on a label-like pool (legal's Yes/No answers): ``select.balance=answer`` at 5 %,
                seed 0, for ``random``, ``grads``, ``grads_paper`` and the loss/norm/IFD baselines
                (each answer gets its pool share of the budget, filled in the selector's order;
                :mod:`grads.selectors.balance`, an option, not the paper's). Skipped elsewhere.
* ``seeds_p50``  (opt-in, not in the default ``--phases``: about 1–1.7 CPU-hours a domain) seeds 1
                and 2 at 50 % for ``random`` and ``grads``, so Table 1's 50 % comparison that
                matters rests on 3 seeds like the 5 % one; a folder per selector and seed.
* ``cheap``     the cheaper selection variants (RESULTS.md, "Cost of selection") end to end at 5 %,
                seed 0: ``grads_w5`` = GrADS on a warm-up of 5 % of the pool (``warmup.fraction=0.05``)
                + the features pass; ``grads_rec`` = the norms recorded during the full warm-up
                (``features.source=warmup``). Their rows say whether the cheap subsets train alike.

"Strongest baseline" = lowest held-out domain bits per byte (the headline domain metric, RESULTS.md
"Noise floor") at 5 %, seed 0, among the non-GrADS selectors of ``paper_main`` (loss_high, gradnorm,
ifd, length, less, rds; :func:`grads.paper.decisions.strongest_baselines`); the choice is written to ``<results>/plan.json`` before it is used, as is ``ablation_seeds``'s
cell.

After every phase the domain's runs are collected into ``results/tables/<domain>/`` (CSV, per-item
results for the paired CIs, tables, plots) and the selected ids of every run are copied to
``results/tables/<domain>/selections/`` (one small JSONL per method, budget and seed;
:mod:`grads.paper.publish`). Re-running a phase after an interruption recomputes only what the
stage cache lacks.

    python scripts/run_tables.py financial                       # every phase
    python scripts/run_tables.py financial --phases main_p5      # one phase
    python scripts/run_tables.py financial --dry-run             # print the commands
    python scripts/run_tables.py financial --status              # finished / planned jobs per phase
    python scripts/run_tables.py financial --collect-only        # re-collect what has finished
    python scripts/run_tables.py financial --views-only          # subset views from results/ only
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from grads.constants import REPO_ROOT
from grads.io import read_json, write_json
from grads.paper.decisions import (
    best_ablation_cell,
    default_at_p50,
    grid_leader,
    strongest_baselines,
)
from grads.paper.frames import collect
from grads.paper.protocol import (
    CHEAP,
    HEADLINE,
    ablation_sources,
    baselines,
    default_grads_run,
    domains,
    main_selectors,
    rules,
)
from grads.paper.publish import collect_domain, pool_answers
from grads.paper.views import selection_views

PHASES = [
    "main_p5",
    "seeds_p5",
    "main_p50",
    "ablation",
    "ablation_seeds",
    "leader_seeds",
    "default_p50",
    "cheap",
    "balanced",
]
# more compute, asked for by name (--phases seeds_p50): not part of the 12-hour protocol
EXTRA_PHASES = ["seeds_p50"]
ALL_PHASES = PHASES + EXTRA_PHASES
# phases whose jobs depend on what has run (plan[phase]: the seeds still to run; empty: skipped)
TOP_UP = ("leader_seeds", "default_p50")
# the balanced phase: the selectors whose legal subsets were one class, and their references
BALANCED = ["random", "grads", "grads_paper", "loss_high", "gradnorm", "ifd"]


def subphases() -> dict[str, list[str]]:
    """The phases run as one sweep per part: Table 2 as one sweep per gradient source (the
    default's cell, ``conf/selector/grads.yaml``'s rule and layers, is the ``grads`` run of
    ``main_p5``: the same selection, not trained again, :func:`grads.paper.frames.with_default_cell`
    puts it in the grid), and one sweep per cheap selection variant."""
    return {"ablation": list(ablation_sources()), "cheap": list(CHEAP)}


def ablation_overrides(phase: str, default: str | None = None) -> list[str]:
    """One source's sweep of Table 2: every rule but the default's, when this is its source."""
    _, d_rule, d_source = (default or default_grads_run()).split(".")
    source = ablation_sources()[phase]
    todo = [r for r in rules() if (r, source) != (d_rule, d_source)]
    return [f"selector.layers=[{source.replace('+', ',')}]", f"selector.rule={','.join(todo)}"]


def expand_phases(phases: list[str]) -> list[str]:
    """The sweeps of ``phases`` in order (``ablation`` and ``cheap`` are one sweep per part)."""
    parts = subphases()
    return [p for ph in phases for p in parts.get(ph, [ph])]


def phase_overrides(phase: str, plan: dict) -> list[str]:
    """The ``grads -m`` overrides of one phase (``plan``: the strongest baselines, when needed)."""
    if phase == "main_p5":
        return [
            "experiment=paper_main",
            "budget=p5",
            "seed=0",
            f"selector={','.join(main_selectors())}",
        ]
    if phase == "seeds_p5":
        # + grads_paper: the paper-faithful GrADS variant gets the seeds the default rule gets
        sels = ["random", "grads", "grads_paper", *plan["strongest"][:2]]
        return ["experiment=paper_main", "budget=p5", "seed=1,2", f"selector={','.join(sels)}"]
    if phase == "main_p50":  # + grads_paper, as at 5 %
        sels = ["random", "grads", "grads_paper", plan["strongest"][0]]
        return ["experiment=paper_main", "budget=p50", "seed=0", f"selector={','.join(sels)}"]
    if phase in ablation_sources():
        return ["experiment=paper_ablation", *ablation_overrides(phase)]
    if phase == "ablation_seeds":
        return [
            "experiment=paper_ablation",
            f"selector.layers=[{','.join(plan['layers'])}]",
            f"selector.rule={plan['rule']}",
            "seed=1,2",
        ]
    if phase == "seeds_p50":
        return [
            "experiment=paper_main",
            "budget=p50",
            "seed=1,2",
            "selector=random,grads",
            "hydra.sweep.subdir=${selector.name}_seed${seed}",
        ]
    if phase == "default_p50":  # the grads default, changed since main_p50 ran it
        return ["experiment=paper_main", "budget=p50", "seed=0", "selector=grads"]
    if phase == "leader_seeds":  # only the seeds the leader lacks in this domain (plan)
        return [
            "experiment=paper_ablation",
            f"selector.layers=[{','.join(plan['leader_layers'])}]",
            f"selector.rule={plan['leader_rule']}",
            f"seed={','.join(map(str, plan['leader_seeds']))}",
            # a job folder per seed, not per job number: a rerun that runs only the seeds still
            # missing (say [2] after seed 1 finished) must not write seed 2 into seed 1's folder 0
            "hydra.sweep.subdir=seed${seed}",
        ]
    if phase == "balanced":  # plan["balanced"]: the selectors, empty on a pool without labels
        return [
            "experiment=paper_main",
            "budget=p5",
            "seed=0",
            "select.balance=answer",
            f"selector={','.join(plan['balanced'])}",
            "hydra.sweep.subdir=${selector.name}",  # a rerun with another list overwrites nothing
        ]
    if phase in CHEAP:
        return [
            "experiment=paper_main",
            "budget=p5",
            "seed=0",
            "selector=grads",
            f"selector.name={phase}",
            *CHEAP[phase],
        ]
    raise ValueError(f"unknown phase {phase!r}; choose from {ALL_PHASES}")


def answer_classes(runs_dir: Path) -> dict[str, int]:
    """The pool's answers and their counts when they are labels (``{}`` for free text), from any
    run of the domain (every run shares the pool)."""
    from collections import Counter

    config = next(iter(sorted((runs_dir / "main_p5").rglob("config_resolved.yaml"))), None)
    if config is None:
        raise SystemExit(f"no main_p5 run under {runs_dir}: run that phase first")
    answers = pool_answers(config)
    return dict(sorted(Counter(answers.values()).items())) if answers else {}


def phase_dir(phase: str, plan: dict, runs_dir: Path) -> Path:
    """Where a phase's jobs go: ``leader_seeds`` one folder per leader, so that a later leader (once
    more domains are in) adds runs instead of overwriting the earlier leader's."""
    if phase == "leader_seeds":
        return runs_dir / phase / plan["leader"]
    if phase == "default_p50":
        return runs_dir / phase / plan["default_cell"]
    return runs_dir / phase


# phases whose jobs follow the grads default: main_p5..main_p50 run `grads`; an ablation sweep
# (:func:`subphases`) leaves the default's cell out (it is main_p5's `grads` run)
FOLLOW_DEFAULT = ("main_p5", "seeds_p5", "main_p50", "seeds_p50")


def check_default_unchanged(phase: str, runs_dir: Path) -> None:
    """Refuse to rerun a phase whose finished jobs ran under another ``grads`` default: Hydra
    numbers the jobs of a sweep, so the new default's jobs would overwrite the old default's runs
    (a Table 2 cell, seeds included) in their folders."""
    ablation = phase in ablation_sources()
    if not (phase in FOLLOW_DEFAULT or ablation) or not (runs_dir / phase).is_dir():
        return
    default = default_grads_run()
    cells = {r.get("grads_cell") for r in collect(runs_dir / phase)[0]}
    stale = [c for c in cells if c and c != default] if not ablation else []
    if ablation and default in cells:  # swept leaving out an earlier default
        stale = [default]
    if stale:
        raise SystemExit(
            f"{runs_dir / phase} ran under another grads default ({', '.join(sorted(stale))} vs "
            f"today's {default} in conf/selector/grads.yaml); rerunning it would overwrite those "
            "runs. Finished phases need no rerun: the new default's 5 % runs are its Table 2 cell "
            "and leader_seeds, its 50 % run is default_p50. To start over under the new default, "
            "give another --runs-dir."
        )


def phase_plan(
    phase: str, runs_dir: Path, plan_file: Path, dry_run: bool, domain: str = "legal"
) -> dict:
    """What a phase needs from earlier ones (strongest baselines, best ablation cell), merged into
    ``plan_file`` before the phase runs; placeholders in a dry run before those phases exist."""
    if phase in ("seeds_p5", "main_p50"):
        if dry_run and not (runs_dir / "main_p5").exists():
            return {"strongest": ["<best baseline>", "<second baseline>"]}
        new = strongest_baselines(runs_dir)
        print(f"strongest baselines by {HEADLINE}: {new['strongest'][:2]}")
    elif phase == "ablation_seeds":
        if dry_run and not any((runs_dir / ph).exists() for ph in ablation_sources()):
            return {"rule": "<best rule>", "layers": ["<best source>"]}
        new = best_ablation_cell(runs_dir)
        print(f"best ablation cell by {HEADLINE} (seed 0): {new['best_cell']}")
    elif phase == "leader_seeds":
        if dry_run and not any((runs_dir / ph).exists() for ph in ablation_sources()):
            return {"leader": "<leader>", "leader_rule": "<rule>", "leader_layers": ["<source>"],
                    "leader_seeds": [1, 2]}  # fmt: skip
        new = grid_leader(domain, runs_dir, plan_file.parent.parent)
        print(
            f"Table 2 leader over {', '.join(new['leader_over'])}: {new['leader']}; "
            f"seeds to run here: {new['leader_seeds'] or 'none'}"
        )
    elif phase == "default_p50":
        new = default_at_p50(runs_dir)
    elif phase == "balanced":
        if dry_run and not (runs_dir / "main_p5").exists():
            return {"balanced": BALANCED}
        classes = answer_classes(runs_dir)
        new = {"balanced": BALANCED if classes else [], "answer_classes": classes}
        print(f"answers: {classes or 'not label-like (free text): nothing to balance'}")
    else:
        return {}
    plan = {**(read_json(plan_file) if plan_file.is_file() else {}), **new}
    if not dry_run:
        write_json(plan_file, plan)
    return plan


def phase_status(domain: str, runs_dir: Path, plan_file: Path) -> list[tuple[str, int, int]]:
    """``(phase, finished jobs, planned jobs)`` for every phase of the domain (a phase that depends
    on an unfinished one, for the strongest baselines or the best ablation cell, is counted with
    stand-in names: the count does not depend on them)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for phase in expand_phases(ALL_PHASES):
        # what it depends on may not have finished: any names give the same job count
        stand_in = {
            "strongest": baselines()[:2],
            "rule": rules()[0],
            "layers": ["embed"],
            "leader": "<leader>",
            "leader_rule": rules()[0],
            "leader_layers": ["embed"],
            "leader_seeds": [1, 2],
            "default_cell": "<default>",
            "default_p50": [0],
            "balanced": BALANCED,
        }
        try:
            plan = phase_plan(phase, runs_dir, plan_file, dry_run=True, domain=domain)
        except SystemExit:
            plan = stand_in
        if any("<" in str(v) for v in plan.values()):  # a dry run's placeholders
            plan = stand_in
        done = (
            sum(1 for _ in (runs_dir / phase).rglob("metrics.json"))
            if (runs_dir / phase).is_dir()
            else 0
        )
        if phase in TOP_UP:  # what ran + what is still lacking
            planned = done + len(plan[phase])
        elif phase == "balanced" and not plan["balanced"]:
            planned = 0
        else:
            ov = parser.parse_overrides(phase_overrides(phase, plan))
            planned = len(BasicSweeper.split_arguments(ov, max_batch_size=None)[0])
        out.append((phase, done, planned))
    return out


def run_phases(
    domain: str,
    phases: list[str],
    runs_dir: Path,
    results_dir: Path,
    dry_run: bool = False,
    overrides: list[str] = (),
) -> None:
    """Run ``phases`` of ``domain`` in order, each one ``grads -m`` sweep, collecting after each
    (a dry run prints the commands); stops after a phase with failed jobs."""
    plan_file = results_dir / "plan.json"
    for phase in expand_phases(phases):
        check_default_unchanged(phase, runs_dir)
        plan = phase_plan(phase, runs_dir, plan_file, dry_run, domain)
        if (phase in TOP_UP or phase == "balanced") and not plan[phase]:
            print(f"== {phase}: nothing to run here", flush=True)
            continue
        cmd = [
            sys.executable,
            "-m",
            "grads.cli.main",
            "-m",
            *phase_overrides(phase, plan),
            f"domain={domain}",
            f"hydra.sweep.dir={phase_dir(phase, plan, runs_dir)}",
            *overrides,
        ]
        print(f"== {phase}: {shlex.join(cmd[2:])}", flush=True)  # quoted: pastes into a shell
        if dry_run:
            continue
        t0 = time.time()
        rc = subprocess.run(cmd).returncode
        print(f"== {phase} {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
              f"{(time.time() - t0) / 60:.1f} min", flush=True)  # fmt: skip
        collect_domain(domain, runs_dir, results_dir)  # what finished is kept either way
        if rc != 0:  # later phases read this one's results (plan.json): stop here
            raise SystemExit(
                f"phase {phase} had failed jobs (Hydra runs every job of a sweep, then fails); "
                f"the finished ones are collected under {results_dir}; fix and rerun: finished "
                "stages are cache hits"
            )


def main(argv: list[str] | None = None) -> None:
    """``scripts/run_tables.py``: the phases of one domain, or its status, collection or views."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("domain", choices=domains())
    ap.add_argument("--phases", nargs="+", default=PHASES, choices=ALL_PHASES,
                    help=f"default: {' '.join(PHASES)} (opt-in: {' '.join(EXTRA_PHASES)})")  # fmt: skip
    ap.add_argument("--runs-dir", default=None, help="default: <repo>/outputs/tables/<domain>")
    ap.add_argument("--results-dir", default=None, help="default: <repo>/results/tables/<domain>")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--status", action="store_true", help="finished / planned jobs per phase")
    ap.add_argument(
        "--views-only",
        action="store_true",
        help="regenerate sources_/overlap_/profile_/lengths_ from the committed selections",
    )
    ap.add_argument("overrides", nargs="*", help="extra overrides for every phase (key=value)")
    args = ap.parse_args(argv)
    runs_dir = Path(args.runs_dir or REPO_ROOT / "outputs" / "tables" / args.domain).resolve()
    results_dir = Path(args.results_dir or REPO_ROOT / "results" / "tables" / args.domain).resolve()
    if args.status:
        for phase, done, planned in phase_status(args.domain, runs_dir, results_dir / "plan.json"):
            print(f"{phase:17s} {done:3d} / {planned:3d} jobs{'  done' if done >= planned else ''}")
        return
    if args.views_only:
        selection_views(args.domain, results_dir)
        return
    if args.collect_only:
        collect_domain(args.domain, runs_dir, results_dir)
        return
    run_phases(args.domain, args.phases, runs_dir, results_dir, args.dry_run, args.overrides)
