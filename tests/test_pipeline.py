"""End to end: the smoke experiment, stage caching across a sweep, resume after a kill, the notebook,
and every experiment file's first grid point with tiny overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grads.pipeline import STAGES, StageInterrupted, run
from tests.conftest import CONF_DIR, REPO, compose, sweep_axes

# Small enough for CI: the tiny model, 40 samples, 64 tokens, 2 training steps, 8 eval items.
TINY = [
    "model=tiny",
    "logger=none",
    "domain.pool_limit=40",
    "data.max_seq_len=64",
    "trainer.micro_batch_size=8",
    "warmup.max_steps=2",
    "finetune.max_steps=2",
    "trainer.save_every=1",
    "features.batch_size=8",
    "eval.limit=8",
    "eval.task_limits=null",
    "eval.general_tasks=[]",
    "eval.batch_size=16",
]


def _run(tmp_path: Path, overrides: list[str]) -> dict:
    cfg = compose([f"paths.output_dir={tmp_path}", *overrides])
    tmp_path.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the run folder defaults to ./outputs/runs outside Hydra
    try:
        return run(cfg)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    metrics = _run(out, ["experiment=smoke", *TINY])
    return out, metrics


def test_smoke_end_to_end(smoke_run):
    out, m = smoke_run
    assert m["stages"] == list(STAGES) and m["cache_misses"] == list(STAGES)
    for key in ("domain_acc", "general_acc", "domain_gain", "forgetting"):
        assert isinstance(m[key], float), key
    for key in (
        "domain_loss",
        "domain_bpb",
        "domain_loss_gain",
        "ref_nll",
        "text_bpb",
        "general_kl",
    ):
        assert isinstance(m[key], float), key  # the continuous metrics (grads.evaluation.metrics)
    assert m["items"]["tuned"]["domain_loss"] and m["items"]["base"]["domain_loss"]
    assert m["n_pool"] == 40 and m["n_selected"] == 10  # p25
    art = {k: Path(v) for k, v in m["artefacts"].items()}
    assert (art["features"] / "features.parquet").exists()
    for f in ("selection.jsonl", "selection.json", "selection.png"):
        assert (art["select"] / f).exists()
    assert m["cost"]["warmup"]["tokens"] > 0 and m["cost"]["features"]["tokens"] > 0
    assert m["selection_cost_s"] > 0
    # each stage's peak memory; no CUDA here, so no GPU column
    for stage, c in m["cost"].items():
        assert c["peak_rss_gb"] > 0.01 and "peak_gpu_gb" not in c, stage
    run_dirs = list(out.rglob("run_info.json"))
    assert run_dirs and json.loads(run_dirs[0].read_text())["versions"]["torch"]


def test_rerun_hits_the_cache_everywhere(smoke_run):
    out, first = smoke_run
    again = _run(out, ["experiment=smoke", *TINY])
    assert again["cache_hits"] == list(STAGES) and again["cache_misses"] == []
    assert again["domain_acc"] == first["domain_acc"] and again["keys"] == first["keys"]


def test_notebook_executes_on_the_smoke_run(smoke_run):
    import jupytext
    from nbclient import NotebookClient

    out, _ = smoke_run
    run_dir = next(out.rglob("run_info.json")).parent
    nb = jupytext.read(REPO / "notebooks" / "analyse_run.py")
    os.environ["GRADS_RUN_DIR"] = str(run_dir)
    try:
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        ).execute()
    finally:
        os.environ.pop("GRADS_RUN_DIR", None)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert any(
        o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", [])
    )


def test_sweep_shares_warmup_and_features(tmp_path):
    """A Hydra multirun over 2 selectors x 2 budgets runs warm-up and features exactly once."""
    cmd = [
        sys.executable,
        "-m",
        "grads.cli.main",
        "-m",
        "experiment=smoke",
        *TINY,
        "stages=[warmup,features,select]",
        "selector=grads,random",
        "budget=p10,p50",
        f"paths.output_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").rglob("metrics.json"))]
    assert len(jobs) == 4
    misses = [s for j in jobs for s in j["cache_misses"]]
    assert (
        misses.count("warmup") == 1
        and misses.count("features") == 1
        and misses.count("select") == 4
    )
    assert len({j["keys"]["features"] for j in jobs}) == 1
    assert sorted(j["n_selected"] for j in jobs) == [4, 4, 20, 20]


def test_killed_finetune_resumes_without_recomputing(tmp_path):
    ov = [
        "experiment=smoke",
        *TINY,
        "finetune.max_steps=4",
        "stages=[warmup,features,select,finetune]",
    ]
    with pytest.raises(StageInterrupted):
        _run(tmp_path, [*ov, "+finetune.stop_after_steps=2"])
    partial = list((tmp_path / "cache" / "finetune").glob("*.partial"))
    assert len(partial) == 1  # kept for resuming, never renamed into place
    m = _run(tmp_path, ov)
    assert m["cache_hits"] == ["warmup", "features", "select"] and m["cache_misses"] == ["finetune"]
    log = [json.loads(x) for x in open(Path(m["artefacts"]["finetune"]) / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # steps 1-2 before the kill, 3-4 after resume
    info = json.loads((Path(m["artefacts"]["finetune"]) / "stage.json").read_text())
    assert info["attempts"] == 2 and info["wall_s"] > info["attempt_wall_s"]
    assert m["cost"]["finetune"]["wall_s"] == round(max(info["wall_s"], info["wall_time_s"]), 2)
    # Same weights as an uninterrupted run of the same config.
    ref = _run(tmp_path / "ref", ov)
    assert ref["keys"] == m["keys"]
    import torch
    from safetensors.torch import load_file

    def weights(d):
        d = Path(d)
        f = next(d.rglob("adapter_model.safetensors"))
        return load_file(f)

    a, b = weights(m["artefacts"]["finetune"]), weights(ref["artefacts"]["finetune"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


EXPERIMENTS = sorted(f.stem for f in (CONF_DIR / "experiment").glob("*.yaml"))
# Only sizes shrink: the experiment's own trainer (mode, lr, batch), eval suite (task lists, shots,
# prompt format), selector and budget run as configured. A real model becomes the tiny one in the
# default suite; `-m slow` keeps it.
SIZES = [
    "domain.pool_limit=24",
    "data.max_seq_len=64",
    "warmup.max_steps=2",
    "finetune.max_steps=2",
    "eval.limit=2",
    "eval.task_limits=null",
]


def grid_point(name: str, index: int) -> list[str]:
    """The ``index``-th point of a covering walk of the experiment's sweep grid: point i takes the
    (i mod len)-th value of every axis, so len(longest axis) points use every value of every axis."""
    cfg = compose([f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or OmegaConf.create({}))
    axes = sweep_axes(params)
    return [f"{k}={vals[index % len(vals)]}" for k, vals in axes.items()]


def grid_width(name: str) -> int:
    cfg = compose([f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or OmegaConf.create({}))
    return max([len(v) for v in sweep_axes(params).values()] or [1])


def _check_experiment_run(tmp_path: Path, name: str, point: list[str], model: list[str]) -> None:
    expected = OmegaConf.to_container(compose([f"experiment={name}", *point]), resolve=True)
    m = _run(tmp_path, [f"experiment={name}", *point, *model, *SIZES])
    assert m["stages"] == list(STAGES) and isinstance(m["domain_acc"], float)
    assert (
        m["domain"] == expected["domain"]["name"] and m["selector"] == expected["selector"]["name"]
    )
    assert m["budget"] == expected["budget"]["name"]
    assert m["trainer_mode"] == expected["trainer"]["mode"]
    general = expected["eval"]["general_tasks"] + expected["domain"]["eval_tasks_general"]
    for task in expected["domain"]["eval_tasks"] + general:  # the experiment's own eval suite
        assert task in m["tasks"], task
    ft = json.loads((Path(m["artefacts"]["finetune"]) / "ds_config.json").read_text())
    assert ft["train_micro_batch_size_per_gpu"] == expected["trainer"]["micro_batch_size"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_with_its_own_trainer_and_eval(tmp_path, name):
    """One grid point per experiment, end to end; which point rotates with the experiment so
    that the suite does not only ever run first points."""
    point = grid_point(name, EXPERIMENTS.index(name))
    model = [] if compose([f"experiment={name}"]).model.source == "tiny" else ["model=tiny"]
    _check_experiment_run(tmp_path, name, point, model)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_covering_grid_runs_with_its_model(tmp_path, name):
    """Every value of every sweep axis at least once, with the experiment's own model."""
    for i in range(grid_width(name)):
        _check_experiment_run(tmp_path, name, grid_point(name, i), [])


def test_skipped_bad_rows_reach_metrics_json(tmp_path):
    pool = tmp_path / "pool.jsonl"
    good = [json.dumps({"q": f"question {i}?", "a": f"answer {i}."}) for i in range(12)]
    pool.write_bytes(
        ("\n".join(good[:6]) + "\n").encode()
        + b'{"q": "broken", "a": \n{"q": "caf\xe9", "a": "x"}\n{"a": "no q"}\n'
        + ("\n".join(good[6:]) + "\n").encode()
    )
    src = f"{{name: mine, path: '{pool}', prompt: '{{q}}', response: '{{a}}'}}"
    m = _run(
        tmp_path,
        [
            "experiment=smoke",
            *TINY,
            "data.on_bad_row=skip",
            "~domain.generator",
            f"domain.sources=[{src}]",
            "stages=[warmup,features,select]",
        ],
    )
    assert m["data"]["mine:read"] == 12 and m["data"]["mine:bad_row"] == 3
    assert m["data"]["mine:bad_row:invalid_json"] == 1 and m["data"]["mine:bad_row:not_utf8"] == 1
    assert m["data"]["mine:bad_row:missing_field"] == 1
    metrics = json.loads(next(tmp_path.glob("outputs/runs/*/*/metrics.json")).read_text())
    assert metrics["data"] == m["data"]


def test_stage_memory_measures_the_peak_of_its_own_window():
    import numpy as np

    from grads.io import reset_peak_rss
    from grads.pipeline import stage_memory

    if not reset_peak_rss():
        pytest.skip("this platform cannot start a new peak-memory window")
    with stage_memory() as big:
        block = np.ones(300 * 2**20 // 8)  # 300 MB, touched
        del block
    with stage_memory() as small:
        pass
    assert big["peak_rss_gb"] >= small["peak_rss_gb"] + 0.25
