"""GPU readiness: the stages' device placement (CUDA mocked), the GPU check's reduced CPU mode end to
end, its table's robustness, and the wheel bundle's dependency closure (no network)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` reporting two GPUs; nothing is ever allocated on them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


class FakeModel:
    """Records where ``.to`` sent it (a real module would need a real GPU)."""

    def __init__(self):
        self.device = torch.device("cpu")

    def to(self, device):
        self.device = torch.device(device)
        return self


# --------------------------------------------------------------------------------------------------
# Device placement
# --------------------------------------------------------------------------------------------------
def test_compute_device_is_the_local_ranks_gpu(fake_cuda, monkeypatch):
    from grads.dist import compute_device

    assert compute_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert compute_device() == torch.device("cuda", 1)  # rank 3 of 2 visible cards
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device() == torch.device("cpu")


def test_features_job_moves_the_model_to_the_gpu(fake_cuda, monkeypatch, tmp_path):
    import grads.data.pool
    import grads.features.compute
    from grads.stages import features

    model, seen = FakeModel(), {}
    monkeypatch.setattr(features, "load_trained", lambda cfg, path: (model, "tokenizer"))
    monkeypatch.setattr(
        grads.data.pool,
        "load_pool",
        lambda cfg, tok, return_stats=False, **kw: (["row"], {"read": 1}),
    )
    monkeypatch.setattr(
        grads.features.compute,
        "run_features",
        lambda cfg, m, tok, pool, work: seen.update(at=m.device),
    )
    features.features_job({}, "warmup_dir", str(tmp_path))
    assert seen["at"] == torch.device("cuda", 0)


def test_evaluate_stage_moves_both_models_and_records_the_device(fake_cuda, monkeypatch, tmp_path):
    import grads.evaluation
    import grads.models
    from grads.stages import evaluate

    tuned, base, seen = FakeModel(), FakeModel(), {}
    monkeypatch.setattr(evaluate, "load_trained", lambda cfg, path: (tuned, "tokenizer"))
    monkeypatch.setattr(grads.models, "load_model", lambda cfg, cache_dir=None: (base, "tok"))

    def fake_run_evaluate(cfg, model, tok, work, load_base):
        seen["tuned"], seen["base"] = model.device, load_base()[0].device
        return {"domain_acc": 0.5}

    monkeypatch.setattr(grads.evaluation, "run_evaluate", fake_run_evaluate)
    cfg = {"model": {}, "paths": {"model_dir": None}}
    out = evaluate.evaluate(cfg, tmp_path, tmp_path)
    assert seen == {"tuned": torch.device("cuda", 0), "base": torch.device("cuda", 0)}
    assert out == {"domain_acc": 0.5, "device": "cuda:0"}


def test_deepspeed_cpu_accelerator_next_to_cuda_is_refused(fake_cuda, monkeypatch):
    from grads.training.distributed import import_deepspeed

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES="):
        import_deepspeed()


# --------------------------------------------------------------------------------------------------
# The check's reduced CPU mode, end to end (a subprocess: it sets CUDA_VISIBLE_DEVICES and chdirs)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    table = json.loads((out / "gpu_check.json").read_text())
    return proc, {(r["section"], r["case"]): r for r in table["rows"]}, out


def test_cpu_mode_runs_every_section_without_failure(cpu_check):
    proc, rows, out = cpu_check
    failed = {k: r["result"] for k, r in rows.items() if r["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    cases = set(rows)
    for name in ("tiny_tied", "tiny_untied", "smollm2"):
        assert {("grads", f"{name} fp32"), ("grads", f"{name} bf16")} <= cases
    for trainer in ("cpu", "zero2", "zero3"):
        assert {("deepspeed", f"{trainer} lora"), ("deepspeed", f"{trainer} full")} <= cases
    assert {("speed", m) for m in ("train", "features", "naive", "features / naive")} <= cases
    assert "| smoke" in (out / "gpu_check.md").read_text()


def test_cpu_mode_numbers(cpu_check):
    _, rows, _ = cpu_check
    for name in ("tiny_tied", "tiny_untied", "smollm2"):
        assert max(rows["grads", f"{name} fp32"]["data"]["max_rel_err"].values()) < 1e-5
        assert max(rows["grads", f"{name} bf16"]["data"]["max_rel_err"].values()) < 2e-2
    losses = rows["deepspeed", "zero3 full"]["data"]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert rows["deepspeed", "zero3 lora"]["data"]["engine_device"] == "cpu"


def test_cpu_mode_smoke_records_the_device_of_every_model_stage(cpu_check):
    _, rows, _ = cpu_check
    for stage in ("warmup", "features", "finetune", "evaluate"):
        assert rows["smoke", f"{stage} device"]["data"]["device"] == "cpu", stage
    assert rows["smoke", "select device"]["data"]["device"] is None


@pytest.mark.slow
def test_cpu_mode_zero3_offload(tmp_path):
    """The CPU-offload case the default CPU mode leaves out (DeepSpeedCPUAdam builds for ~1 min)."""
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)]
    cmd += ["--sections", "deepspeed", "--ds-trainers", "zero3_offload"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {
        r["case"]: r["data"].get("optimizer") for r in rows if r["case"] != "init_distributed"
    } == {
        "zero3_offload lora": "DeepSpeedCPUAdam",
        "zero3_offload full": "DeepSpeedCPUAdam",
    }


def test_failed_or_late_cases_still_complete_the_table(tmp_path):
    gc = _script("gpu_check")
    rep = gc.Report(tmp_path, budget_s=60.0, header={"mode": "test"})

    def boom():
        raise ValueError("first line\nsecond line")

    gc.run_case(rep, "s", "raises", boom)
    gc.run_case(rep, "s", "fails", lambda: ("bad", {"ok": False}))
    gc.run_case(rep, "s", "passes", lambda: ("fine", {"x": 1}))
    gc.run_case(rep, "s", "too late", lambda: ("never", {}), need_s=3600.0)
    got = [(r.case, r.status, r.result) for r in rep.rows]
    assert got == [
        ("raises", "FAIL", "ValueError: first line"),
        ("fails", "FAIL", "bad"),
        ("passes", "ok", "fine"),
        ("too late", "skip", got[3][2]),
    ]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["status"] for r in saved["rows"]] == ["FAIL", "FAIL", "ok", "skip"]


# --------------------------------------------------------------------------------------------------
# Wheel bundle (no network: fetch is replaced by fake wheels)
# --------------------------------------------------------------------------------------------------
def _fake_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
        name, "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return path


def test_bundle_requirements_follow_markers_for_cpython312_linux(tmp_path):
    gb = _script("gpu_bundle")
    wheel = _fake_wheel(
        tmp_path,
        "pkg",
        [
            "numpy>=1.20",
            'pywin32; sys_platform == "win32"',
            'tomli; python_version < "3.11"',
            'pytest; extra == "dev"',
            'typing-extensions>=4; python_version >= "3.8"',
        ],
    )
    assert gb.requirements(wheel) == [("numpy", ">=1.20"), ("typing-extensions", ">=4")]


def test_bundle_fetches_the_closure_minus_what_the_gpu_has(tmp_path, monkeypatch):
    gb = _script("gpu_bundle")
    graph = {"root": ["Has_Dep", "needs-newer>=2", "leaf"], "leaf": ["root"], "needs-newer": []}

    def fake_fetch(name, version, out):
        return _fake_wheel(out, gb.norm(name).replace("-", "_"), graph[gb.norm(name)])

    monkeypatch.setattr(gb, "fetch", fake_fetch)
    (tmp_path / "stale-0.1-py3-none-any.whl").write_bytes(b"old")
    present = {"has-dep": None, "needs-newer": "1.5"}
    rows = gb.bundle(tmp_path, ["root"], present)
    assert sorted(r["wheel"].split("-")[0] for r in rows) == ["leaf", "needs_newer", "root"]
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.whl")) == [
        "leaf",
        "needs_newer",
        "root",
    ]
    assert gb.satisfied({"x": "2.0"}, "X", ">=2") and not gb.satisfied({}, "x", "")


def test_gpu_run_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_run.sh")]).returncode == 0
