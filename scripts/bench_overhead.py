"""The fixed cost of a grads run: what a rerun pays that is not compute.

Runs the smoke experiment (tiny model, synthetic domain) as a user would, each command a fresh
process in a private output folder, and times:

* **first run**: every stage computed (fills the cache; for reference);
* **cached rerun**: the same command again, every stage a cache hit;
* **select-only rerun**: ``grads-select`` with a new budget: warm-up and features from the cache,
  the selection and its export computed;
* **HPO trial**: a new ``finetune.lr``, as one trial of a sweep: fine-tune and evaluate computed.

For each, ``compute`` is the wall time the computed stages record (``metrics.json`` cost rows) and
``overhead`` the rest of the process's wall time. A second table splits that overhead into its parts,
measured in order in one fresh interpreter: starting Python and importing the CLI, Hydra's
composition, the config checks, the evaluation task check, the stage keys, torch, loading the
model, DeepSpeed's import and process group (one process: no comm op), and loading the comm op
that a run of several processes needs (never built here: ``python -m grads.ds_ops`` does that).

Usage::

    python scripts/bench_overhead.py                    # 3 repetitions, a temporary folder
    python scripts/bench_overhead.py --reps 5 --model smollm2_135m --out /tmp/bench_overhead
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("warmup", "features", "select", "finetune", "evaluate")


def grads_env() -> dict[str, str]:
    """This environment, offline, importing grads from this checkout first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key, value in (
        ("DS_ACCELERATOR", "cpu"),
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("WANDB_MODE", "disabled"),
        ("OMP_WAIT_POLICY", "PASSIVE"),
    ):
        env.setdefault(key, value)
    return env


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """Wall seconds of ``cmd`` (which must succeed) and its output."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=grads_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n{(res.stdout + res.stderr)[-4000:]}")
    return wall, res.stdout + res.stderr


def newest_metrics(out: Path) -> dict:
    files = sorted(out.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text())


def computed_s(metrics: dict) -> float:
    """Wall seconds of the stages this run computed (cache hits cost nothing here)."""
    cost = metrics.get("cost") or {}
    return sum(float(row.get("wall_s", 0.0)) for row in cost.values() if not row.get("cached"))


def run_rows(args, out: Path) -> list[tuple[str, list[float], list[float]]]:
    """``(label, walls, computes)`` for each kind of run."""
    py = [sys.executable, "-m"]
    base = ["experiment=smoke", f"model={args.model}", f"paths.output_dir={out / 'outputs'}"]
    rows = []

    def repeat(label: str, make_cmd, reps: int) -> None:
        walls, comps = [], []
        for i in range(reps):
            wall, _ = timed(make_cmd(i), out)
            walls.append(wall)
            comps.append(computed_s(newest_metrics(out / "outputs" / "runs")))
            print(f"  {label} #{i + 1}: {wall:.1f} s", flush=True)
        rows.append((label, walls, comps))

    start, _ = timed([sys.executable, "-c", "import grads.cli.main"], out)
    rows.append(("python + import grads.cli.main", [start], [0.0]))
    compose, _ = timed([*py, "grads.cli.main", "--cfg", "job", *base], out)
    rows.append(("grads --cfg job (compose only)", [compose], [0.0]))
    repeat("first run (every stage computed)", lambda i: [*py, "grads.cli.main", *base], 1)
    repeat("cached rerun", lambda i: [*py, "grads.cli.main", *base], args.reps)
    repeat(
        "select-only rerun (grads-select)",
        lambda i: [*py, "grads.cli.select", *base, "budget=n100", f"budget.value={40 + i}"],
        args.reps,
    )
    repeat(
        "HPO trial (new finetune.lr)",
        lambda i: [*py, "grads.cli.main", *base, f"++finetune.lr={1.1e-3 + 1e-4 * i:.6g}"],
        args.reps,
    )
    return rows


# --------------------------------------------------------------------------------------------------
# The overhead's parts, in one fresh interpreter (this script with --phases)
# --------------------------------------------------------------------------------------------------
def phases(model: str, out: Path) -> None:
    """Time each fixed-cost part in the order a run pays it; prints one JSON line."""
    t_start = time.perf_counter()
    laps: list[tuple[str, float]] = []

    def lap(name: str, t0: float) -> None:
        laps.append((name, time.perf_counter() - t0))

    t0 = time.perf_counter()
    import grads.cli.main  # noqa: F401

    lap("import grads.cli.main", t0)
    t0 = time.perf_counter()
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from grads.constants import conf_dir

    overrides = ["experiment=smoke", f"model={model}", f"paths.output_dir={out / 'outputs'}"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    lap("Hydra composition", t0)
    t0 = time.perf_counter()
    from grads.config import validate_config

    resolved = OmegaConf.to_container(validate_config(cfg), resolve=True)
    lap("config checks (validate_config)", t0)
    t0 = time.perf_counter()
    from grads.evaluation import validate_tasks

    validate_tasks(resolved)
    lap("evaluation task check (validate_tasks)", t0)
    t0 = time.perf_counter()
    from hydra.utils import instantiate

    from grads.pipeline import resolve_features_cfg, stage_identities

    selector = instantiate(resolved["selector"])
    stage_identities(resolve_features_cfg(resolved, selector), list(STAGES))
    lap("stage keys (identities)", t0)
    _model_and_ops(resolved, laps)
    laps.append(("total", time.perf_counter() - t_start))
    print("PHASES " + json.dumps(laps), flush=True)


def _model_and_ops(resolved: dict, laps: list) -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    laps.append(("import torch (if not yet)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    from grads.models import load_model

    load_model(dict(resolved["model"]), cache_dir=resolved["paths"]["model_dir"])
    laps.append((f"load model ({resolved['model']['name']})", time.perf_counter() - t0))
    t0 = time.perf_counter()
    from grads.ds_ops import comm_op_for
    from grads.training.distributed import ensure_dist, import_deepspeed

    import_deepspeed()
    with comm_op_for(1):
        ensure_dist()
    laps.append(("DeepSpeed import + process group (1 process)", time.perf_counter() - t0))
    from grads import ds_ops

    builder = ds_ops._comm_builder()
    if builder is not None and ds_ops.is_built(ds_ops.build_directory(builder.name), builder.name):
        t0 = time.perf_counter()
        builder.load(verbose=False)
        laps.append(("comm op load (several processes; built)", time.perf_counter() - t0))
    else:
        laps.append(("comm op load (several processes): not built here", float("nan")))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def table(rows: list[tuple[str, list[float], list[float]]]) -> str:
    from tabulate import tabulate

    body = []
    for label, walls, comps in rows:
        wall, comp = statistics.median(walls), statistics.median(comps)
        spread = f"{min(walls):.1f}-{max(walls):.1f}" if len(walls) > 1 else ""
        body.append([label, len(walls), f"{wall:.1f}", spread, f"{comp:.1f}", f"{wall - comp:.1f}"])
    head = ["run", "n", "wall s (median)", "range", "compute s", "overhead s"]
    return tabulate(body, head, tablefmt="github")


def phase_table(laps: list) -> str:
    from tabulate import tabulate

    body = [[name, "-" if s != s else f"{s:.2f}"] for name, s in laps]  # nan: not measured
    return tabulate(body, ["part of the fixed cost (one fresh process)", "s"], tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each rerun")
    ap.add_argument("--model", default="tiny", help="model option (tiny, smollm2_135m, ...)")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)  # the child mode
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        out = Path(args.out or tmp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        if args.phases:
            phases(args.model, out)
            return 0
        load = os.getloadavg()[0]
        print(f"bench_overhead: {os.cpu_count()} CPUs, load {load:.1f}, out {out}", flush=True)
        rows = run_rows(args, out)
        child = [sys.executable, __file__, "--phases", "--model", args.model, "--out", str(out)]
        _, text = timed(child, out)
        laps = json.loads(next(x for x in text.splitlines() if x.startswith("PHASES "))[7:])
        print(f"\n{table(rows)}\n\n{phase_table(laps)}")
        print(f"\nload average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
