"""grads installed like any Python tool: the wheel carries the configs and the lm-eval task files,
and an installed ``grads`` writes where it is started, never into the package.

The wheel is built from a copy of the tracked tree (a build in place would leave ``build/`` behind,
whose stale files a later wheel could carry), installed with ``pip install --target`` away from the
checkout and put first on ``PYTHONPATH``; its dependencies come from this environment. The smoke
experiment then runs in an empty folder with no ``GRADS_*`` variable but ``GRADS_DATA_DIR`` (its
evaluation reads WikiText-2 and AlpacaEval references), and in a private ``TORCH_EXTENSIONS_DIR``
that must stay empty: a single-process run neither builds nor loads DeepSpeed's comm op.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, REPO, compose

TASKS = REPO / "grads" / "evaluation" / "tasks"


def _copy_tracked_tree(dst: Path) -> None:
    """The files git would ship (tracked, plus new ones not ignored) copied to ``dst``."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel . --no-deps --no-build-isolation`` with this environment's pip."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    _copy_tracked_tree(src)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    res = subprocess.run([*cmd, "-q", "-w", str(dist)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = dist.glob("grads-*.whl")
    return whl


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed with ``pip install --target`` (byte-compiled, as an install is)."""
    target = tmp_path_factory.mktemp("site") / "site-packages"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    res = subprocess.run(
        [*cmd, "--target", str(target), str(wheel)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return target


def _installed_env(site: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without any GRADS_* variable, importing grads from ``site`` only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADS_")}
    env.update(
        PYTHONPATH=str(site),
        TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _console(site: Path, name: str) -> list[str]:
    """A console script that ``pip install --target`` wrote (its shebang is this interpreter)."""
    script = site / "bin" / name
    assert script.is_file(), sorted(p.name for p in (site / "bin").iterdir())
    return [sys.executable, str(script)]


def test_setup_cfg_lists_every_package():
    """setup.cfg lists the packages by hand (find: cannot map conf/ to grads.conf): none missing."""
    from setuptools import find_packages

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    assert listed == set(find_packages(str(REPO), include=["grads*"])) | {"grads.conf"}
    assert cfg["options"]["package_dir"].split() == ["grads.conf", "=", "conf"]


def test_wheel_carries_the_configs_and_task_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"grads/conf/{p.relative_to(CONF_DIR)}" for p in CONF_DIR.rglob("*.y*ml")}
    configs |= {f"grads/conf/{p.relative_to(CONF_DIR)}" for p in CONF_DIR.rglob("*.json")}
    assert "grads/conf/config.yaml" in configs and "grads/conf/trainer/ds/cpu.json" in configs
    assert configs <= names, sorted(configs - names)
    tasks = {f"grads/evaluation/tasks/{p.relative_to(TASKS)}" for p in TASKS.rglob("*.yaml")}
    tasks |= {f"grads/evaluation/tasks/{p.relative_to(TASKS)}" for p in TASKS.rglob("*.py")}
    assert len(tasks) > 20 and tasks <= names, sorted(tasks - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "grads-config = grads.cli.config:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_installed_smoke_runs_in_the_working_directory(site, tmp_path, data_dir):
    """``grads experiment=smoke`` from the installed wheel, started in an empty folder: the run,
    its cache and models land under that folder, the package is untouched, no op is built."""
    work = tmp_path / "work"
    work.mkdir()
    before = _files(site)
    env = _installed_env(site, tmp_path, GRADS_DATA_DIR=str(data_dir))
    res = subprocess.run(
        [*_console(site, "grads"), "experiment=smoke"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    (metrics,) = (work / "outputs" / "runs").rglob("metrics.json")
    assert json.loads(metrics.read_text())["domain_acc"] is not None
    resolved = OmegaConf.load(metrics.parent / "config_resolved.yaml")
    assert resolved.paths.output_dir == str(work / "outputs")
    assert resolved.paths.cache_dir == str(work / "outputs" / "cache")
    assert any((work / "outputs" / "cache").iterdir())
    assert _files(site) == before  # nothing written into the installed package
    assert not (tmp_path / "torch_extensions").exists(), "a single-process run built an op"
    assert "op build" not in log and "shm_comm" not in log
    # The rerun is all cache hits and pays no model, no lm-eval task loading (and, without a GPU
    # driver to ask, no torch): -X importtime lists every module it imported.
    rerun = [sys.executable, "-X", "importtime", *_console(site, "grads")[1:], "experiment=smoke"]
    res = subprocess.run(rerun, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (res.stdout + res.stderr).count("cache hit") == 5
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert not {"lm_eval", "transformers", "deepspeed"} & imported
    if not any(Path("/dev").glob(p) for p in ("nvidia*", "kfd", "dxg")):
        assert "torch" not in imported
    assert _files(site) == before


def test_installed_config_copy_is_a_new_option(site, tmp_path):
    """``grads-config cp`` copies a shipped experiment; ``--config-dir`` composes the edited copy."""
    env = _installed_env(site, tmp_path)
    mine = tmp_path / "my_conf" / "experiment" / "mine.yaml"
    cp = subprocess.run(
        [*_console(site, "grads-config"), "cp", "experiment/smoke", str(mine)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert cp.returncode == 0, cp.stderr
    assert f"grads --config-dir {tmp_path / 'my_conf'} experiment=mine" in cp.stdout
    assert str(site / "grads" / "conf" / "experiment" / "smoke.yaml") in cp.stdout
    mine.write_text(mine.read_text().replace("group: smoke", "group: my_edit"))
    show = subprocess.run(
        [*_console(site, "grads"), "--config-dir", str(mine.parent.parent), "experiment=mine"]
        + ["--cfg", "job", "--resolve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert show.returncode == 0, show.stderr
    cfg = OmegaConf.create(show.stdout)
    assert cfg.group == "my_edit" and cfg.model.name == "tiny"
    assert cfg.paths.output_dir == str(tmp_path / "outputs") and cfg.paths.data_dir is None


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """This process as an installed grads: no checkout around it (the configs stay conf/)."""
    import grads.constants

    for var in grads.constants.PATH_ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(grads.constants, "CHECKOUT", False)
    monkeypatch.setenv("GRADS_CONF_DIR", str(CONF_DIR))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_installed_defaults_follow_the_working_directory(installed, monkeypatch):
    from grads.config import validate_config

    cfg = validate_config(compose(["experiment=smoke"]))
    assert cfg.paths.root_dir == str(installed)
    assert cfg.paths.output_dir == str(installed / "outputs")
    assert cfg.paths.model_dir == str(installed / "outputs" / "models")
    assert cfg.paths.data_dir is None  # synthetic pool: no data folder needed
    monkeypatch.setenv("GRADS_HOME", "home")  # relative: from the working directory
    cfg = validate_config(compose(["experiment=smoke"]))
    assert cfg.paths.cache_dir == str(installed / "home" / "outputs" / "cache")


def test_installed_real_domain_needs_grads_data_dir(installed, monkeypatch, data_dir):
    from grads.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="paths.data_dir is not set: the domain 'legal'") as exc:
        validate_config(compose(["domain=legal"]))
    assert "GRADS_DATA_DIR" in str(exc.value) and "None/" not in str(exc.value)
    pool = installed / "pool.jsonl"
    pool.write_text('{"instruction": "q", "output": "a"}\n')
    custom = ["domain=custom", f"domain.path={pool}", "domain.prompt='{instruction}'"]
    cfg = validate_config(compose([*custom, "domain.response='{output}'"]))  # needs no data
    assert cfg.domain.sources[0].path == str(pool)
    monkeypatch.setenv("GRADS_DATA_DIR", str(data_dir))
    cfg = validate_config(compose(["domain=legal"]))
    assert cfg.domain.sources[0].path.startswith(str(data_dir))


def test_a_checkout_keeps_its_defaults(monkeypatch, tmp_path):
    """In a checkout the defaults hang off the repository whatever the working directory."""
    import grads.constants
    from grads.config import validate_config

    for var in grads.constants.PATH_ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("GRADS_CONF_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert grads.constants.CHECKOUT and grads.constants.conf_dir() == REPO / "conf"
    cfg = validate_config(compose(["experiment=smoke"]))
    assert cfg.paths.output_dir == str(REPO / "outputs")
    assert cfg.paths.data_dir == os.path.abspath(REPO.parent / "shared" / "data")
