"""Sweeps that optimise: the configured objective, the hpo_* experiments, 3 Optuna trials end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grads.objective import check_objective, lookup, objective_value
from tests.conftest import REPO, compose

METRICS = {
    "domain_acc": 0.5,
    "forgetting": 0.125,
    "stages": ["warmup", "features", "select", "finetune", "evaluate"],
    "tasks": {"grads_synthetic": {"acc": 0.25}},
    "n_pool": 40,
}


def _cfg(**objective):
    return OmegaConf.create({"objective": objective})


def test_objective_picks_the_configured_metric():
    assert objective_value(_cfg(metric="domain_acc", direction="maximize"), METRICS) == 0.5
    assert objective_value(_cfg(metric="tasks/grads_synthetic/acc"), METRICS) == 0.25
    assert lookup(METRICS, "tasks.grads_synthetic.acc") == 0.25
    two = _cfg(metric=["domain_acc", "forgetting"], direction=["maximize", "minimize"])
    assert objective_value(two, METRICS) == (0.5, 0.125)
    assert check_objective(_cfg(metric=["a", "b"], direction="minimize"))[1] == ["minimize"] * 2


def test_missing_metric_fails_clearly_when_required():
    with pytest.raises(
        KeyError, match=r"objective.metric \['domain_loss'\] not in this run"
    ) as err:
        objective_value(_cfg(metric="domain_loss", required=True), METRICS)
    assert "'domain_acc', 'forgetting', 'n_pool', 'tasks/grads_synthetic/acc'" in str(err.value)
    # Not required (a plain run): nothing to optimise, no error.
    assert objective_value(_cfg(metric="domain_loss", required=False), METRICS) is None
    assert objective_value(_cfg(metric="domain_loss"), METRICS) is None  # auto, outside a sweep


@pytest.mark.parametrize(
    ("objective", "match"),
    [
        ({"direction": "up"}, "expected maximize or minimize"),
        ({"metric": ["a", "b"], "direction": ["maximize"] * 3}, "needs one direction each"),
        ({"required": "sometimes"}, "objective.required"),
    ],
)
def test_bad_objective_config(objective, match):
    with pytest.raises(ValueError, match=match):
        check_objective(_cfg(**objective))


def test_hpo_experiments_compose_with_the_optuna_sweeper():
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(["experiment=hpo_finetune"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"finetune.lr", "finetune.lora.r", "budget"}
    assert cfg.finetune.lr and cfg.finetune.lora.r  # the searched keys exist (no `+` needed)
    pareto = compose(["experiment=hpo_pareto"], return_hydra_config=True)
    assert list(pareto.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert pareto.hydra.sweeper.sampler._target_.endswith("NSGAIISampler")
    # A sweeper direction that contradicts the objective's is refused before any work.
    bad = compose(
        ["experiment=hpo_finetune", "hydra.sweeper.direction=minimize"], return_hydra_config=True
    )
    HydraConfig.instance().set_config(bad)
    try:
        with pytest.raises(ValueError, match=r"hydra.sweeper.direction=\['minimize'\]"):
            check_objective(bad)
    finally:
        HydraConfig.instance().cfg = None


def test_finetune_knobs_do_not_touch_the_warmup_key():
    from grads.pipeline import stage_keys

    def keys(*over):
        cfg = compose(["experiment=hpo_finetune", "paths.output_dir=/tmp/x", *over])
        return stage_keys(OmegaConf.to_container(cfg, resolve=True))

    a, b = keys(), keys("finetune.lr=3e-4", "finetune.lora.r=4")
    assert a["warmup"] == b["warmup"] and a["features"] == b["features"]
    assert a["finetune"] != b["finetune"]


# --------------------------------------------------------------------------------------------------
# End to end: 3 Optuna trials on the tiny model
# --------------------------------------------------------------------------------------------------
TINY = [
    "model=tiny",
    "logger=none",
    "domain.pool_limit=40",
    "data.max_seq_len=64",
    "data.system_prompt=null",
    "trainer.micro_batch_size=8",
    "warmup.max_steps=2",
    "finetune.max_steps=2",
    "features.batch_size=8",
    "eval.limit=8",
    "eval.task_limits=null",
    "eval.batch_size=16",
]


def _sweep(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "grads.cli",
            "-m",
            "experiment=hpo_finetune",
            *TINY,
            f"paths.output_dir={out}",
            *extra,
        ],
        cwd=out,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("hpo")
    res = _sweep(out, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={out / 'sweep'}")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_three_optuna_trials_end_to_end(sweep):
    trials = sorted((sweep / "sweep").glob("[0-9]*/metrics.json"))
    assert len(trials) == 3
    metrics = [json.loads(t.read_text()) for t in trials]
    best = OmegaConf.load(sweep / "sweep" / "optimization_results.yaml")
    assert best.name == "optuna"
    assert best.best_value == max(m["domain_acc"] for m in metrics)
    for t, m in zip(trials, metrics):
        trial_cfg = OmegaConf.load(t.parent / "config_resolved.yaml")
        # Each trial ran with the knobs Optuna chose: the budget, and the fine-tune's own lr.
        assert m["budget"] == trial_cfg.budget.name in {"p5", "p10", "p25", "p50"}
        log = Path(m["artefacts"]["finetune"]) / "train_log.jsonl"
        lrs = [json.loads(line)["lr"] for line in log.read_text().splitlines()]
        assert max(lrs) == pytest.approx(trial_cfg.finetune.lr)
        assert trial_cfg.finetune.lora.r in (4, 8, 16, 32)
    # One warm-up and one features table serve every trial.
    for stage in ("warmup", "features"):  # one entry each (the cache's .locks folder aside)
        entries = [p for p in (sweep / "cache" / stage).iterdir() if not p.name.startswith(".")]
        assert len(entries) == 1, entries


def test_sweep_with_a_missing_objective_metric_fails_clearly(sweep):
    res = _sweep(
        sweep,
        "hydra.sweeper.n_trials=1",
        "objective.metric=no_such_metric",
        "objective.direction=minimize",
        "objective.required=auto",  # detects that the Optuna sweeper is waiting for the value
        f"hydra.sweep.dir={sweep / 'sweep_missing'}",
    )
    assert res.returncode != 0
    assert "objective.metric ['no_such_metric'] not in this run's metrics" in res.stderr
