"""Several processes and nodes (grads.launch), SLURM (hydra/launcher=slurm, the sbatch template) and
the sweep's shared stages first (grads.fanout).

The distributed runs are two "nodes" of one process each on localhost (Gloo): two ``grads``
commands with ``dist.nnodes=2``, ``dist.node_rank`` 0 / 1 and a c10d endpoint on a free loopback
port, against one process with the same global batch (2 x 4 = 1 x 8), within the tolerance of the
trainer's own 2-process test (1e-5). The default suite runs the warm-up + features comparison
(about a minute on 2 idle cores); the killed-node run with its resume and torchrun are ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from grads.cli.agent import before_hydra
from grads.launch import DistSettings, dist_problems, expand_nodelist, free_port, slurm_nodes
from tests.conftest import REPO

SMOKE = [
    "experiment=smoke",
    "logger=none",
    "eval=none",
    "domain.pool_limit=40",
    "data.max_seq_len=64",
    "trainer.lora.dropout=0.0",  # dropout masks are drawn per rank: the split would change weights
]
NODE = [
    "dist.nnodes=2",
    "dist.local_addr=127.0.0.1",
    "dist.timeout_s=60",
    "dist.rdzv_timeout_s=120",
]


# --------------------------------------------------------------------------------------------------
# Settings: SLURM, dist.*, the trainer's world size
# --------------------------------------------------------------------------------------------------
def test_expand_nodelist_as_scontrol_prints_it():
    assert expand_nodelist("gpu[01-03,07],login-a") == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "login-a",
    ]
    assert expand_nodelist("n[8-10]x") == ["n8x", "n9x", "n10x"]
    assert expand_nodelist("single") == ["single"]


def _srun_env(node: int) -> dict[str, str]:
    """What ``srun --ntasks-per-node=1`` sets on node ``node`` of a 2-node job."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_NODEID": str(node),
    }


def test_dist_settings_come_from_slurm_inside_srun(monkeypatch):
    monkeypatch.setattr("grads.launch.shutil.which", lambda name: None)  # no scontrol: the parser
    for node in (0, 1):
        s = DistSettings.from_cfg({}, env=_srun_env(node))
        assert (s.nnodes, s.node_rank, s.rdzv_endpoint, s.run_id) == (
            2,
            node,
            "gpu07:29500",
            "4242",
        )
    batch_step = {k: v for k, v in _srun_env(0).items() if not k.startswith("SLURM_STEP")}
    assert slurm_nodes(batch_step) is None  # the batch script itself runs on one node
    per_gpu = {**_srun_env(0), "SLURM_STEP_NUM_TASKS": "16"}  # srun with one task per GPU
    assert DistSettings.from_cfg({}, env=per_gpu).nnodes == 1
    explicit = {"dist": {"nnodes": 3, "rdzv_endpoint": "head", "node_rank": 2}}
    s = DistSettings.from_cfg(explicit, env={})
    assert (s.nnodes, s.node_rank, s.rdzv_endpoint, s.run_id) == (3, 2, "head:29500", "grads")


def test_dist_problems_name_the_key():
    assert dist_problems({}) == []
    problems = dist_problems({"dist": {"timeout_s": 0, "nodes": 2, "max_restarts": -1}})
    assert any(p.startswith("dist.timeout_s=0") for p in problems), problems
    assert any(p.startswith("dist.nodes: unknown key") for p in problems), problems
    assert any(p.startswith("dist.max_restarts=-1") for p in problems), problems
    # several nodes asked of a process that no launcher started: fail before any stage runs
    (problem,) = dist_problems({"dist": {"nnodes": 2, "rdzv_endpoint": "h:1"}})
    assert "not started as one of 2 nodes" in problem


def test_validate_config_reports_dist_keys():
    from grads.config import ConfigError, compose_resolved

    with pytest.raises(ConfigError, match=r"dist\.rdzv_timeout_s=0"):
        compose_resolved(["experiment=smoke", "dist.rdzv_timeout_s=0"])


def test_nodes_multiply_the_trainer_world_and_key_it_like_processes():
    """trainer.procs is per node: 2 nodes x 1 process train like 1 node x 2 processes."""
    from grads.config import compose_resolved
    from grads.pipeline import job_identities
    from grads.training import TrainerSettings

    def warmup_key(*overrides: str) -> tuple[int, str]:
        cfg = compose_resolved([*SMOKE, *overrides], validate=False)
        world = TrainerSettings.from_cfg(cfg, "warmup").resolved_procs()
        return world, job_identities(cfg, ["warmup"])["warmup"].key

    one = warmup_key()
    two_nodes = warmup_key("dist.nnodes=2")
    two_procs = warmup_key("trainer.procs=2")
    assert two_nodes[0] == two_procs[0] == 2 and one[0] == 1
    assert two_nodes[1] == two_procs[1] != one[1]  # the global batch doubles either way


def test_plain_runs_and_info_flags_start_nothing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["grads", "experiment=smoke"]
    assert before_hydra(argv, "grads.cli.main") is False and argv == ["grads", "experiment=smoke"]
    # under torchrun, --cfg on rank 1: nothing to do (rank 0 prints), no process group formed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert before_hydra(["grads", "--cfg", "job"], "grads.cli.main") is True
    monkeypatch.setenv("RANK", "0")
    assert before_hydra(["grads", "--cfg", "job"], "grads.cli.main") is False


# --------------------------------------------------------------------------------------------------
# Two nodes on localhost vs one process
# --------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"}


def _grads(out: Path, *overrides: str, log: str) -> subprocess.Popen:
    """``grads <SMOKE> <overrides>`` writing under ``out`` and its output to ``<out>/../<log>``;
    in its own session, so that a test can stop it like a node that dies."""
    cmd = [sys.executable, "-m", "grads.cli.main", *SMOKE, f"paths.output_dir={out}", *overrides]
    log_path = out.parent / log
    p = subprocess.Popen(
        cmd,
        stdout=open(log_path, "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=_env(),
        start_new_session=True,
    )
    p.log_path = log_path  # type: ignore[attr-defined]
    return p


def _two_nodes(out: Path, *overrides: str, tag: str = "") -> list[subprocess.Popen]:
    """Node 0 and node 1 of one run: the same command but for dist.node_rank."""
    port = free_port()
    nodes = []
    for k in (0, 1):
        rdzv = [f"dist.node_rank={k}", f"dist.rdzv_endpoint=127.0.0.1:{port}"]
        nodes.append(_grads(out, *NODE, *rdzv, *overrides, log=f"{out.name}{tag}.node{k}.log"))
    return nodes


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        rc = p.wait(timeout=900)
        assert rc == 0, f"{p.log_path.name} exited with {rc}:\n{p.log_path.read_text()[-4000:]}"


def _metrics(out: Path) -> dict:
    """The run's ``metrics.json`` (there is one run folder, rank 0's) and its model config."""
    (path,) = (out / "runs").rglob("metrics.json")
    m = json.loads(path.read_text())
    m["model_cfg"] = yaml.safe_load((path.parent / "config_resolved.yaml").read_text())["model"]
    return m


def _features(m: dict) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(Path(m["artefacts"]["features"]) / "features.parquet").to_pylist()


def _weights(m: dict, stage: str) -> dict:
    from grads.training import load_trained

    model, _ = load_trained(m["model_cfg"], Path(m["artefacts"][stage]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(one: dict, two: dict, stages: tuple[str, ...]) -> None:
    """Same keys, same features table (1e-5) and the same weights (1e-5) for ``stages``."""
    import torch

    assert one["keys"] == two["keys"]  # the same global batch is the same cache entry
    a, b = _features(one), _features(two)
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 40
    for x, y in zip(a, b, strict=True):
        for col in x:
            if col != "id":
                assert x[col] == pytest.approx(y[col], rel=1e-5, abs=1e-5, nan_ok=True), col
    for stage in stages:
        wa, wb = _weights(one, stage), _weights(two, stage)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), (stage, k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """Warm-up and features in one process, global batch 8."""
    out = tmp_path_factory.mktemp("one") / "out"
    p = _grads(out, "stages=[warmup,features]", "trainer.micro_batch_size=8", log="one.log")
    _wait([p])
    return _metrics(out)


def test_two_nodes_match_one_process(tmp_path, one_process):
    """Two nodes x 1 process x micro-batch 4: the features table and the warm-up's weights of one
    process x micro-batch 8; rank 0 alone made a run folder and the cache entries."""
    out = tmp_path / "two"
    _wait(_two_nodes(out, "stages=[warmup,features]", "trainer.micro_batch_size=4"))
    two = _metrics(out)
    assert len(list((out / "runs").glob("*/*"))) == 1  # no other rank composed a run folder
    summary = json.loads((Path(two["artefacts"]["warmup"]) / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    features = json.loads((Path(two["artefacts"]["features"]) / "features.json").read_text())
    assert features["world_size"] == 2
    events = [json.loads(x) for x in (out / "cache" / "events.jsonl").read_text().splitlines()]
    assert {e["pid"] for e in events} == {events[0]["pid"]}  # one writer of the cache
    assert_same_run(one_process, two, ("warmup",))


def _kill_node(node: subprocess.Popen) -> None:
    """Kill a node outright: its elastic agent and every worker it started (their own sessions)."""
    import psutil

    agent = psutil.Process(node.pid)
    for p in [*agent.children(recursive=True), agent]:
        p.kill()


@pytest.mark.slow
def test_killed_node_fails_the_run_clearly_and_the_rerun_resumes(tmp_path):
    """Node 1 dies in the warm-up after its first checkpoint: node 0 fails within the collective
    timeout saying how to resume; the same two commands again resume the warm-up from its
    checkpoint and give one process's features table, selection and warm-up / fine-tune weights."""
    out, ref = tmp_path / "two", tmp_path / "one"
    run = ["stages=[warmup,features,select,finetune]", "warmup.epochs=3", "trainer.save_every=2"]
    nodes = _two_nodes(out, *run, "trainer.micro_batch_size=4", tag=".killed")
    one = _grads(ref, *run, "trainer.micro_batch_size=8", log="one.log")
    deadline = time.monotonic() + 600
    while not list((out / "cache" / "warmup").glob("*.partial/checkpoints/latest")):
        assert time.monotonic() < deadline and nodes[0].poll() is None, "no checkpoint"
        time.sleep(0.5)
    _kill_node(nodes[1])
    t_kill = time.monotonic()
    rc = nodes[0].wait(timeout=300)
    failed_in = time.monotonic() - t_kill
    log = nodes[0].log_path.read_text()
    assert rc != 0 and failed_in < 120, (rc, failed_in)  # a failure, not a hang
    assert "the run failed on node 0" in log and "Re-run the same command" in log, log[-3000:]
    _wait([one])
    _wait(_two_nodes(out, *run, "trainer.micro_batch_size=4", tag=".rerun"))
    two = _metrics(out)
    summary = json.loads((Path(two["artefacts"]["warmup"]) / "train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 2 and summary["world_size"] == 2
    reference = _metrics(ref)
    assert_same_run(reference, two, ("warmup", "finetune"))
    ids = [
        [json.loads(x)["id"] for x in (Path(m["artefacts"]["select"]) / "selection.jsonl").open()]
        for m in (reference, two)
    ]
    assert ids[0] == ids[1]


@pytest.mark.slow
def test_torchrun_starts_grads_without_a_second_launch(tmp_path, one_process):
    """``torchrun --nproc-per-node=2 -m grads.cli.main``: rank 0 runs the app (one run folder), rank 1
    serves it, nothing is spawned again; the result is one process's."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "grads.cli.main", *SMOKE, f"paths.output_dir={out}", "stages=[warmup,features]"]
    cmd += ["trainer.micro_batch_size=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((out / "runs").glob("*/*"))) == 1
    two = _metrics(out)
    resolved = yaml.safe_load((out / "runs").rglob("config_resolved.yaml").__next__().read_text())
    assert resolved["dist"]["nnodes"] == 1 and resolved["trainer"]["procs"] == 2  # the layout
    assert_same_run(one_process, two, ("warmup",))


# --------------------------------------------------------------------------------------------------
# SLURM: the launcher preset and the multi-node sbatch template
# --------------------------------------------------------------------------------------------------
def _cfg_hydra(*overrides: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "grads.cli.main", *overrides, "--cfg", "all", "--resolve"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**_env(), "GRADS_SLURM_ACCOUNT": "proj"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return yaml.safe_load(done.stdout)["hydra"]


def test_slurm_preset_composes_into_an_sbatch_file_with_requeue(tmp_path, monkeypatch):
    """``grads hydra/launcher=slurm --cfg ...`` composes (Hydra refuses ``-m`` with ``--cfg``);
    submitit turns the preset into the sbatch flags it documents."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    hydra = _cfg_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = hydra["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert hydra["callbacks"]["shared_stages_first"]["_target_"] == "grads.fanout.SharedStagesFirst"
    assert launcher["account"] == "proj" and launcher["max_num_timeout"] >= 1
    # the plugin's own split of its parameters into executor arguments (hydra_submitit_launcher)
    params = {k: v for k, v in launcher.items() if k != "_target_"}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    init = {"submitit_folder", "max_num_timeout"}
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm", slurm_max_num_timeout=3)
    ex.update_parameters(
        **{(k if k in base else f"slurm_{k}"): v for k, v in params.items() if k not in init}
    )
    sbatch = ex._executor._make_submission_file_text("python -m grads.cli.main", "uid")
    for flag in ("--partition=gpu", "--account=proj", "--requeue", "--time=240", "--mem=64GB"):
        assert f"#SBATCH {flag}" in sbatch, flag
    for flag in ("--gpus-per-node=1", "--cpus-per-task=8", "--signal=USR2@120"):
        assert f"#SBATCH {flag}" in sbatch, flag
    local = _cfg_hydra("hydra/launcher=local")
    assert local["launcher"]["_target_"].endswith("BasicLauncher") and local["callbacks"]


def _fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_multinode_sbatch_renders_one_grads_per_node(tmp_path, monkeypatch):
    """The template with a fake ``srun``/``scontrol``: one task per node running ``grads`` with the
    user's overrides; each node's grads then reads nodes, rank and rendezvous from SLURM."""
    from grads.config import compose_resolved

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "scontrol", "echo gpu07; echo gpu08")
    _fake_tool(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args')
    script = REPO / "scripts" / "slurm" / "multinode.sbatch"
    env = {**_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", **_srun_env(0)}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_STEP")}  # the batch step
    done = subprocess.run(
        ["bash", str(script), "experiment=smoke", "trainer.procs=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun.args").read_text().split("\n")[:-1]
    assert args[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "grads"]
    overrides = args[3:]
    assert overrides == [
        "trainer.procs=auto",
        "dist.rdzv_endpoint=gpu07:29500",
        "experiment=smoke",
        "trainer.procs=1",
    ]
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and "#SBATCH --ntasks-per-node=1" in header
    for node in (0, 1):  # what grads on each node makes of it (srun's environment)
        for var, value in _srun_env(node).items():
            monkeypatch.setenv(var, value)
        cfg = compose_resolved(overrides, validate=False)
        s = DistSettings.from_cfg(cfg)
        assert (s.nnodes, s.node_rank, s.rdzv_endpoint, s.run_id) == (
            2,
            node,
            "gpu07:29500",
            "4242",
        )
        assert cfg["trainer"]["procs"] == 1


# --------------------------------------------------------------------------------------------------
# A sweep's shared stages first
# --------------------------------------------------------------------------------------------------
def test_plan_rounds_never_launch_two_jobs_on_one_key(tmp_path):
    from grads.fanout import Group, plan_round

    def group(keys, jobs):
        g = Group(keys, str(tmp_path))
        g.jobs = list(jobs)
        return g

    def done(stage, key):
        (tmp_path / stage / key).mkdir(parents=True)
        (tmp_path / stage / key / "DONE").write_text("")

    a_plain, a_ifd = group(("wa", "f1"), [0, 1]), group(("wa", "f2"), [2, 3])
    b_alone, c_pair = group(("wb", "f3"), [4]), group(("wc", "f4"), [5, 6])
    groups = [a_plain, a_ifd, b_alone, c_pair]
    first = plan_round(groups, min_jobs=2)
    assert first == [a_plain, c_pair]  # one per warm-up; a lone job computes its own
    done("warmup", "wa"), done("features", "f1"), done("warmup", "wc"), done("features", "f4")
    assert plan_round(groups, min_jobs=2) == [a_ifd]  # the second features variant of wa
    done("features", "f2")
    assert plan_round(groups, min_jobs=2) == []


def test_local_sweep_computes_the_shared_warmup_before_the_grid(tmp_path):
    """``grads -m hydra/launcher=local selector=grads,random``: one pre-step job computes the warm-up
    and features, then both grid jobs find them in the cache (one miss, no lock waits)."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "grads.cli.main", "-m", "hydra/launcher=local", *SMOKE]
    cmd += ["stages=[warmup,features,select]", "selector=grads,random", f"paths.output_dir={out}"]
    cmd += [f"hydra.sweep.dir={out}/grid"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    first, grid = (
        log.index("shared stages first, round 1: 1 pre-step job"),
        log.index("Launching 2"),
    )
    assert first < log.index("[warmup] running") < log.index("shared stages done") < grid
    assert not re.search(r"\[(warmup|features)\] \w+: waiting", log)  # nobody waited on a lock
    events = [json.loads(x) for x in (out / "cache" / "events.jsonl").read_text().splitlines()]
    misses = [e["stage"] for e in events if e["event"] == "miss"]
    assert misses.count("warmup") == 1 and misses.count("features") == 1
    assert all(e.get("waited_s", 0) == 0 for e in events)
    jobs = [json.loads(p.read_text()) for p in sorted((out / "grid").glob("[0-9]*/metrics.json"))]
    assert [j["selector"] for j in jobs] == ["grads", "random"]
    assert all(j["cost"]["warmup"]["cached"] and j["cost"]["features"]["cached"] for j in jobs)
    assert (out / "grid" / "shared" / "0").is_dir()
    assert not list((out / "grid" / "shared").rglob("config_resolved.yaml"))  # not a table row
