"""Evaluate the BASE model on each domain's tasks and on the general suite; print a table.

Besides the accuracy tasks this covers the suite's log-likelihood parts (held-out domain loss per
domain; reference-answer NLL and plain-text bits per byte in the shared general part). KL needs a
tuned model and is not part of a base evaluation.

Composes the same Hydra config as the pipeline (``conf/``), so the task lists, limits and cache keys
are exactly those of ``grads eval=<suite> domain=<d>``; the results land in the base-model cache
(``<cache_dir>/eval_base/``), so later pipeline runs reuse them. The general suite is evaluated once
and shared by the domains; a domain's wall time in the table is its own tasks + the general suite,
i.e. what one ``evaluate`` of a tuned model costs.

Usage:
    python scripts/eval_base.py --suite quick                       # SmolLM2-135M, 3 domains
    python scripts/eval_base.py --suite quick --domains medical --fresh
    python scripts/eval_base.py --suite quick --override eval.limit=4 model=tiny
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from grads.constants import REPO_ROOT, conf_dir

GENERAL_PARTS = ("general", "ref", "text")  # evaluated once, shared by every domain


def _fmt(value, err) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ± {err:.3f}" if err is not None else f"{value:.3f}"


def _compose(suite: str, domain: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"eval={suite}", f"domain={domain}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _evaluate_parts(cfg: dict, general_parts, general: bool, load_base) -> tuple[dict, dict]:
    """Base results of the general parts (``general=True``) or of the domain's own parts."""
    from grads.evaluation import prepare, summarise
    from grads.evaluation.metrics import item_summary
    from grads.evaluation.runner import base_results
    from grads.evaluation.settings import part_lists

    parts = {p: ns for p, ns in part_lists(cfg).items() if ns and ((p in general_parts) == general)}
    plan = prepare(cfg, [n for ns in parts.values() for n in ns])
    scores, _, items, info = base_results(cfg, plan, parts, load_base)
    summ = summarise(
        scores, parts.get("domain", []), parts.get("general", []), cfg["eval"]["metric"]
    )
    entry = {
        "tasks": parts,
        **summ,
        **item_summary(items),
        "wall_s": float(max((i["wall_s"] or 0.0) for i in info.values())),
        "cache": {p: i["cache"] for p, i in info.items()},
    }
    return entry, scores


def _print_report(report: dict, rows: list[tuple]) -> None:
    width = max(len(r[1]) for r in rows) + 2
    print(
        f"\nBase model {report['model']}, eval suite '{report['suite']}' (acc ± stderr; n = items)"
    )
    print(f"{'group':<10}{'task':<{width}}{'n':>6}  {'acc':<16}{'acc_norm':<16}")
    for group, name, s in rows:
        print(
            f"{group:<10}{name:<{width}}{s['n']:>6}  {_fmt(s.get('acc'), s.get('acc_stderr')):<16}"
            f"{_fmt(s.get('acc_norm'), s.get('acc_norm_stderr')):<16}"
        )
    print()
    g = report["general"]
    for d, r in report["domains"].items():
        print(
            f"{d:<10} domain_acc {_fmt(r['domain_acc'], r['domain_acc_stderr']):<16} "
            f"domain_loss {_fmt(r.get('domain_loss'), r.get('domain_loss_stderr')):<16} "
            f"domain_bpb {_fmt(r.get('domain_bpb'), r.get('domain_bpb_stderr')):<16}\n"
            f"{'':<10} wall {r['wall_s']:7.1f} s  + general {g['wall_s']:7.1f} s = "
            f"{r['wall_with_general_s']:7.1f} s  ({r['cache']})"
        )
    print(
        f"{'general':<10} general_acc {_fmt(g['general_acc'], g['general_acc_stderr']):<15} "
        f"acc_norm {_fmt(g.get('general_acc_norm'), None):<8} "
        f"ref_nll {_fmt(g.get('ref_nll'), g.get('ref_nll_stderr')):<16} "
        f"text_bpb {_fmt(g.get('text_bpb'), g.get('text_bpb_stderr')):<16}\n"
        f"{'':<10} wall {g['wall_s']:7.1f} s  ({g['cache']})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite", default="quick", help="conf/eval option (quick | standard | full)"
    )
    parser.add_argument("--domains", nargs="+", default=["medical", "legal", "financial"])
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the base-eval cache (use a throw-away cache folder)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON output (default outputs/eval_base/<suite>_<model>.json)"
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tempfile

    from grads.models import load_model

    overrides = list(args.override)
    if args.fresh:
        overrides.append(f"paths.cache_dir={tempfile.mkdtemp(prefix='grads-eval-base-')}")
    cfgs = {d: _compose(args.suite, d, overrides) for d in args.domains}
    first = cfgs[args.domains[0]]
    model_name = first["model"]["name"]
    loaded: dict = {}

    def load_base():
        if "m" not in loaded:
            t0 = time.perf_counter()
            loaded["m"] = load_model(first["model"], cache_dir=first["paths"]["model_dir"])
            loaded["load_s"] = round(time.perf_counter() - t0, 1)
        return loaded["m"]

    report = {"suite": args.suite, "model": model_name, "domains": {}, "tasks": {}}
    # general parts (accuracy, reference answers, plain text) are shared by the domains
    report["general"], g_scores = _evaluate_parts(first, GENERAL_PARTS, True, load_base)
    report["tasks"] |= g_scores
    rows = []
    for d, cfg in cfgs.items():
        report["domains"][d], scores = _evaluate_parts(cfg, GENERAL_PARTS, False, load_base)
        report["domains"][d]["wall_with_general_s"] = round(
            report["domains"][d]["wall_s"] + report["general"]["wall_s"], 1
        )
        report["tasks"] |= scores
        rows += [
            (d, name, scores[name]) for name in report["domains"][d]["tasks"].get("domain", [])
        ]
    rows += [("general", n, g_scores[n]) for n in report["general"]["tasks"].get("general", [])]
    _print_report(report, rows)
    if "load_s" in loaded:
        print(f"model load {loaded['load_s']} s")
    report["load_s"] = loaded.get("load_s")
    report["host_load_avg"] = os.getloadavg()
    out = Path(args.out or REPO_ROOT / "outputs" / "eval_base" / f"{args.suite}_{model_name}.json")
    from grads.io import write_json

    write_json(out, report)
    print(f"wrote {out}")
    return 0
