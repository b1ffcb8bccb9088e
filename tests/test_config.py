"""Every option of every config group and every experiment composes, resolves, and binds its targets.

Nothing is run or instantiated: ``_target_`` signatures are bound with the node's arguments so a typo
in a knob fails here, not an hour into a run.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose

GROUPS = sorted(
    d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name not in {"local", "hydra"}
)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
EXPERIMENTS = sorted(f.stem for f in (CONF_DIR / "experiment").glob("*.yaml"))
REQUIRED_GROUPS = {
    "model",
    "domain",
    "selector",
    "budget",
    "trainer",
    "eval",
    "logger",
    "paths",
    "experiment",
}


def _targets(node, path=""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _bind_targets(resolved: dict) -> int:
    n = 0
    for path, node in _targets(resolved):
        module, _, name = node["_target_"].rpartition(".")
        target = getattr(importlib.import_module(module), name)
        kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as exc:
            raise AssertionError(
                f"{path}: {node['_target_']} does not accept {sorted(kwargs)}: {exc}"
            ) from exc
        n += 1
    return n


def test_primary_defaults_list_has_every_group():
    primary = OmegaConf.load(CONF_DIR / "config.yaml")
    names = {
        next(iter(d)) if isinstance(d, dict) else d
        for d in (
            OmegaConf.to_container(x) if not isinstance(x, str) else x for x in primary.defaults
        )
    }
    names = {n.replace("optional ", "") for n in names}
    assert names >= REQUIRED_GROUPS
    entries = OmegaConf.to_container(primary.defaults)
    i = entries.index({"experiment": None})
    # experiment (deltas on top of every group) then machine-local overrides, as in lightning-hydra.
    assert entries[i + 1] == {"optional local": "default"}
    # _self_ first: experiment files override the primary config's own values, not the reverse.
    assert entries[0] == "_self_" and all(isinstance(e, dict) for e in entries[1:i])


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_binds(group, option):
    cfg = compose([f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)  # fails on a bad interpolation
    if group != "experiment":
        assert resolved[group], f"{group}={option} composed to an empty node"
    _bind_targets(resolved)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_grid_first_point_composes(name):
    cfg = compose([f"experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or OmegaConf.create({}))
    if name.startswith("paper_"):
        assert params, f"experiment {name} defines no hydra.sweeper.params grid"
    first = [f"{k}={str(v).split(',')[0].strip()}" for k, v in params.items()]
    point = compose([f"experiment={name}", *first])
    _bind_targets(OmegaConf.to_container(point, resolve=True))


@pytest.mark.parametrize("domain", ["synthetic", "medical", "legal", "financial"])
def test_cfg_job_is_instant_and_imports_no_torch(domain):
    # `grads --cfg job` must stay fast: composing a config may not import torch & co.
    code = (
        "import sys\n"
        f"sys.argv = ['grads', '--cfg', 'job', 'model=smollm2_135m', 'domain={domain}']\n"
        "from grads.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'lm_eval', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert f"name: {domain}" in out.stdout


def test_experiment_values_override_the_primary_config():
    demo = compose(["experiment=demo"])
    assert demo.data.max_seq_len == 128 and demo.data.system_prompt and demo.group == "demo"
    main = compose(["experiment=paper_main"])
    assert main.features.ifd is True and main.warmup.seed == 0
    # ... and the command line still wins over the experiment.
    assert compose(["experiment=demo", "data.max_seq_len=64"]).data.max_seq_len == 64
