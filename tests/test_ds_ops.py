"""grads.ds_ops: a build lock left by a killed DeepSpeed op build is removed, a live build is waited
for with a message, and nobody waits silently. The real build runs only in the slow test, always in
a private TORCH_EXTENSIONS_DIR (never the shared ~/.cache/torch_extensions)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grads import ds_ops
from tests.conftest import REPO


def _build_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ext" / "py_cpu" / "deepspeed_shm_comm"
    d.mkdir(parents=True)
    (d / "build.ninja").write_text("")
    _old_lock(d)
    return d


def _old_lock(d: Path, age_s: float = 60.0) -> None:
    """A build lock written ``age_s`` ago (younger ones may belong to a build just starting)."""
    (d / "lock").write_text("")
    t = time.time() - age_s
    os.utime(d / "lock", (t, t))


def test_lock_without_a_builder_is_removed(tmp_path, caplog):
    d = _build_dir(tmp_path)
    t0 = time.monotonic()
    assert ds_ops.clear_stale_build_lock(d, confirm_s=0.3, poll_s=0.05)
    assert not d.exists() and time.monotonic() - t0 < 5
    assert "removing the stale build lock" in caplog.text


def test_a_fresh_lock_is_given_time(tmp_path):
    """A build that has just taken the lock has not started ninja yet: not stale before min_age_s."""
    d = _build_dir(tmp_path)
    (d / "lock").touch()
    t0 = time.monotonic()
    assert ds_ops.clear_stale_build_lock(d, confirm_s=0.1, min_age_s=1.5, poll_s=0.05)
    assert time.monotonic() - t0 >= 1.0


def test_a_live_builder_is_waited_for_with_a_message(tmp_path, caplog):
    d = _build_dir(tmp_path)
    builder = subprocess.Popen(["sleep", "2"], cwd=d)  # stands for ninja / the compiler
    try:
        assert ds_ops.processes_in(d) == [builder.pid]
        t0 = time.monotonic()
        caplog.set_level(logging.WARNING)
        assert ds_ops.clear_stale_build_lock(d, wait_message_s=0.5, confirm_s=0.3, poll_s=0.05)
        assert time.monotonic() - t0 >= 1.5  # not before the builder was gone
        assert f"pids [{builder.pid}]" in caplog.text and "waiting" in caplog.text
    finally:
        builder.wait()


class FakeBuilder:
    NAME = name = "deepspeed_shm_comm"

    def __init__(self, build_dir: Path):
        self.build_dir, self.loads = build_dir, 0

    def load(self, verbose: bool = False):
        self.loads += 1
        self.build_dir.mkdir(parents=True, exist_ok=True)
        (self.build_dir / f"{self.name}.so").write_text("")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    d = tmp_path / "ext" / "py_cpu" / "deepspeed_shm_comm"
    b = FakeBuilder(d)
    monkeypatch.setattr(ds_ops, "_comm_builder", lambda: b)
    monkeypatch.setattr(ds_ops, "build_directory", lambda name: d)
    return b


def test_ensure_returns_at_once_when_built(fake):
    fake.load()
    ds_ops.ensure_comm_op()
    assert fake.loads == 1


def test_ensure_clears_a_stale_lock_then_builds(fake, caplog):
    fake.build_dir.mkdir(parents=True)
    _old_lock(fake.build_dir)
    ds_ops.ensure_comm_op()
    assert fake.loads == 1 and not (fake.build_dir / "lock").exists()
    assert "removing the stale build lock" in caplog.text


# --------------------------------------------------------------------------------------------------
# One build folder per environment; none for a single process
# --------------------------------------------------------------------------------------------------
def test_a_set_torch_extensions_dir_is_used_as_it_is(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert ds_ops.extensions_dir() == tmp_path / "mine"
    assert ds_ops.use_environment_extensions_dir() == tmp_path / "mine"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")


def test_the_default_folder_is_inside_the_environment(monkeypatch, tmp_path):
    """Unset: <sys.prefix>/torch_extensions/<python + torch tag>, exported for the workers."""
    from importlib.metadata import version

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    (tmp_path / "venv").mkdir()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{version('torch')}"
    assert ds_ops.environment_tag() == tag
    want = tmp_path / "venv" / "torch_extensions" / tag
    assert ds_ops.use_environment_extensions_dir() == want
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(want)
    assert ds_ops.build_directory("deepspeed_shm_comm") == want / "deepspeed_shm_comm"


def test_a_read_only_prefix_gets_a_cache_folder_per_interpreter(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ds_ops.os, "access", lambda path, mode: False)
    folders = set()
    for exe in ("/opt/a/bin/python3", "/opt/b/bin/python3"):
        monkeypatch.setattr(sys, "executable", exe)
        folder = ds_ops.extensions_dir()
        assert folder.parent == tmp_path / "cache" / "torch_extensions"
        assert folder.name.startswith(ds_ops.environment_tag() + "_")
        assert ds_ops.extensions_dir() == folder  # stable for one interpreter
        folders.add(folder)
    assert len(folders) == 2  # never shared between two environments


def test_a_single_process_neither_builds_nor_loads_the_comm_op(monkeypatch, tmp_path):
    """comm_op_for(1) turns DeepSpeed's own build inside init_distributed into a no-op (and puts
    it back after); a world of several processes goes through ensure_comm_op."""
    import importlib

    backend = importlib.import_module("deepspeed.comm.torch")
    original = backend.build_shm_op
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    calls = []
    monkeypatch.setattr(ds_ops, "ensure_comm_op", lambda: calls.append("ensure"))
    with ds_ops.comm_op_for(1):
        assert backend.build_shm_op() is None
    assert backend.build_shm_op is original and calls == []
    with ds_ops.comm_op_for(2):
        assert backend.build_shm_op is original
    assert calls == ["ensure"] and not (tmp_path / "ext").exists()


def test_single_process_training_does_not_call_the_build(monkeypatch, tmp_path):
    """run_train's setup (grads.training.recipe._start) for one process: DeepSpeed initialises
    without building the op; ensure_comm_op is never called."""
    import importlib

    from grads.config import compose_resolved
    from grads.training import recipe

    cfg = compose_resolved(["experiment=smoke", f"paths.output_dir={tmp_path}"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(ds_ops, "ensure_comm_op", lambda: pytest.fail("ensure_comm_op called"))
    seen = []
    backend = importlib.import_module("deepspeed.comm.torch")
    # stands for deepspeed.init_distributed: what its TorchBackend would get from build_shm_op
    monkeypatch.setattr(recipe, "ensure_dist", lambda: seen.append(backend.build_shm_op()))
    run = recipe._start(cfg, "warmup", tmp_path)
    assert seen == [None] and run.world == 1


HOLD_GUARD = r"""
import sys, time
from pathlib import Path
from grads.locks import KeyLock
with KeyLock(Path(sys.argv[1]), "DeepSpeed deepspeed_shm_comm op build"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_ensure_waits_for_another_build_and_says_so(fake, caplog):
    guard = fake.build_dir.with_name(f".{fake.build_dir.name}.grads.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_GUARD, str(guard), "2"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline().strip() == "held"
    caplog.set_level(logging.WARNING)
    ds_ops.ensure_comm_op(wait_message_s=0.3)
    holder.wait()
    assert "DeepSpeed deepspeed_shm_comm op build: waiting" in caplog.text
    assert f"pid {holder.pid}" in caplog.text and fake.loads == 1


ENSURE = "from grads.ds_ops import ensure_comm_op; ensure_comm_op(wait_message_s=3)"


@pytest.mark.slow
def test_killed_first_build_does_not_hang_the_next_run(tmp_path):
    """A real build in a private TORCH_EXTENSIONS_DIR is killed mid-compile; a run that was already
    waiting says so within seconds, then breaks the stale locks and builds the op itself."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env["DS_ACCELERATOR"] = "cpu"

    def start(log: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", ENSURE],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,  # its own process group: killing it kills ninja too
        )

    first = start(tmp_path / "first.log")
    second = None
    build = tmp_path / "ext" / "deepspeed_shm_comm"  # TORCH_EXTENSIONS_DIR/<name>
    try:
        deadline = time.monotonic() + 300
        while not ((build / "lock").exists() and ds_ops.processes_in(build)):
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)  # until the compiler runs in the build folder
        second = start(tmp_path / "second.log")
        deadline = time.monotonic() + 120  # importing deepspeed takes a while on a busy box
        while "op build: waiting" not in (tmp_path / "second.log").read_text():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)  # the "killed first run", ninja and compiler included
        first.wait()
        assert (build / "lock").exists()  # what used to hang every later run
        t0 = time.monotonic()
        second.wait(timeout=1200)
        log = (tmp_path / "second.log").read_text()
        assert second.returncode == 0, log[-3000:]
        assert "breaking the stale lock of pid" in log and "removing the stale build lock" in log
        assert any(build.glob("deepspeed_shm_comm*.so")) and not (build / "lock").exists()
        print(f"second run finished {time.monotonic() - t0:.0f} s after the kill:\n{log}")
        third = subprocess.run(
            [sys.executable, "-c", ENSURE], cwd=REPO, env=env, capture_output=True, timeout=120
        )
        assert third.returncode == 0
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
