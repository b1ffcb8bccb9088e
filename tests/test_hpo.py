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
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert (cfg.objective.metric, cfg.objective.direction) == ("domain_bpb", "minimize")
    assert cfg.hydra.callbacks.objective_check._target_ == "grads.objective.ObjectiveCheck"
    assert set(sweeper.params) == {"finetune.lr", "finetune.lora.r", "budget"}
    assert cfg.finetune.lr and cfg.finetune.lora.r  # the searched keys exist (no `+` needed)
    pareto = compose(["experiment=hpo_pareto"], return_hydra_config=True)
    assert list(pareto.objective.metric) == ["domain_bpb", "general_kl"]
    assert list(pareto.hydra.sweeper.direction) == ["minimize", "minimize"]
    assert pareto.hydra.sweeper.sampler._target_.endswith("NSGAIISampler")
    # A sweeper direction that contradicts the objective's is refused before any work.
    bad = compose(
        ["experiment=hpo_finetune", "hydra.sweeper.direction=maximize"], return_hydra_config=True
    )
    HydraConfig.instance().set_config(bad)
    try:
        with pytest.raises(ValueError, match=r"hydra.sweeper.direction=\['maximize'\]"):
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
            "grads.cli.main",
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
    assert best.best_value == min(m["domain_bpb"] for m in metrics)  # the default objective
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


def test_sweep_with_a_missing_objective_metric_fails_before_the_first_trial(sweep):
    res = _sweep(
        sweep,
        "hydra.sweeper.n_trials=1",
        "objective.metric=no_such_metric",
        "objective.direction=minimize",
        "objective.required=auto",  # detects that the Optuna sweeper is waiting for the value
        f"hydra.sweep.dir={sweep / 'sweep_missing'}",
    )
    assert res.returncode != 0
    assert "objective.metric ['no_such_metric'] cannot come from this run" in res.stderr
    assert "no_such_metric is not a key grads writes to metrics.json" in res.stderr
    assert not list((sweep / "sweep_missing").glob("[0-9]*"))  # no trial was started


# --------------------------------------------------------------------------------------------------
# Which metrics a run can produce: decided from the config, before the first trial
# --------------------------------------------------------------------------------------------------
def _pool(tmp_path: Path, n: int = 30) -> Path:
    rows = [{"instruction": f"q{i} ?", "input": "", "output": f"a{i} ."} for i in range(n)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pool


def test_producible_metrics_follow_stages_tasks_and_the_heldout_split(tmp_path):
    from grads.objective import producible

    custom = ["experiment=hpo_finetune", "domain=custom", f"domain.path={_pool(tmp_path)}"]
    have = producible(compose(custom))
    assert {"domain_bpb", "domain_loss", "general_kl", "text_bpb", "n_pool"} <= set(have)
    assert not {"domain_acc", "domain_gain", "general_acc", "forgetting"} & set(have)
    assert "domain_bpb" not in producible(compose([*custom, "domain.heldout=null"]))
    assert producible(compose([*custom, "eval=none"])) == [
        "n_pool",
        "n_selected",
        "seed",
        "selection_cost_s",
        "wall_s",
    ]
    assert "n_pool" not in producible(compose([*custom, "stages=[warmup]"]))
    synthetic = producible(compose(["experiment=hpo_finetune"]))
    assert {"domain_acc", "domain_gain", "domain_bpb", "forgetting"} <= set(synthetic)
    assert "tasks/grads_synthetic/acc" in synthetic


@pytest.mark.parametrize(
    ("metric", "reason"),
    [
        ("domain_acc", r"domain_acc needs domain accuracy tasks \(domain\.eval_tasks\)"),
        ("forgetting", r"forgetting needs general tasks"),
        ("tasks/grads_synthetic/acc", r"no task 'grads_synthetic' among this run's \[\]"),
        ("domain_acuracy", r"domain_acuracy is not a key grads writes"),
    ],
)
def test_an_objective_the_run_cannot_produce_is_refused_naming_what_it_has(
    tmp_path, metric, reason
):
    from grads.objective import ObjectiveCheck

    over = ["experiment=hpo_finetune", "domain=custom", f"domain.path={_pool(tmp_path)}"]
    cfg = compose([*over, f"objective.metric={metric}"], return_hydra_config=True)
    with pytest.raises(ValueError, match=reason) as err:
        check_objective(cfg)  # objective.required=true in the hpo experiments
    assert "This run's metrics: [" in str(err.value) and "'domain_bpb'" in str(err.value)
    with pytest.raises(SystemExit, match=reason):  # Hydra would only warn about an exception
        ObjectiveCheck().on_multirun_start(cfg)
    # Outside a sweep (required=auto), a plain run is not refused for its objective.
    check_objective(compose([*over, f"objective.metric={metric}", "objective.required=auto"]))


def test_custom_pool_sweep_with_an_impossible_objective_stops_before_trial_one(tmp_path):
    _pool(tmp_path)
    res = _sweep(
        tmp_path,
        "domain=custom",
        "domain.path=pool.jsonl",
        "domain.pool_limit=null",
        "objective.metric=domain_acc",
        "objective.direction=maximize",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert res.returncode != 0
    assert "domain_acc needs domain accuracy tasks" in res.stderr
    assert "'domain_bpb'" in res.stderr  # what the run does produce
    assert not (tmp_path / "sweep").exists()  # no trial was started, no stage ran


def test_a_new_sqlite_study_storage_opens(tmp_path):
    """``hydra.sweeper.storage=sqlite:///...``: the sweeper's Optuna cannot stamp a new database
    under SQLAlchemy 2 on its own; the hpo_* experiments' StudyStorage callback prepares it."""
    import optuna

    from grads.objective import StudyStorage

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    cfg = compose(
        ["experiment=hpo_finetune", f"hydra.sweeper.storage={url}"], return_hydra_config=True
    )
    assert cfg.hydra.callbacks.study_storage._target_ == "grads.objective.StudyStorage"
    StudyStorage().on_multirun_start(cfg)
    for n in (1, 2):  # created, then resumed
        study = optuna.create_study(storage=url, study_name="s", load_if_exists=True)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
        assert len(study.trials) == n
    StudyStorage().on_multirun_start(compose(["experiment=hpo_finetune"], True))  # no storage
