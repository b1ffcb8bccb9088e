"""What a user sees from the console scripts: a user error is one message and exit status 1 (its
traceback behind HYDRA_FULL_ERROR=1 or -v), an unexpected error keeps its traceback; budget labels
follow the value used; the representation passes show progress.

The console scripts run as subprocesses on configs that fail validation (a few seconds each, no
model is loaded); errors raised later, inside a stage, go through the same handler and are checked
with the pipeline replaced by one that raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grads.errors import USER_ERRORS, UserError, is_user_error
from tests.conftest import REPO, compose

HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."


def _script(name: str, module: str) -> list[str]:
    """The installed console script, else the same entry point through the interpreter."""
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _run(cmd: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**base, "PYTHONPATH": str(REPO), "GRADS_OUTPUT_DIR": str(tmp_path / "out"), **env},
    )


def _grads(tmp_path: Path, *overrides: str, script="grads", module="grads.cli.main", **env: str):
    return _run(
        [*_script(script, module), "model=tiny", "logger=none", *overrides], tmp_path, **env
    )


# --------------------------------------------------------------------------------------------------
# grads, grads-select: config errors
# --------------------------------------------------------------------------------------------------
def test_a_bad_config_value_is_one_message(tmp_path):
    res = _grads(tmp_path, "budget.value=-3")
    assert res.returncode == 1
    assert "budget.value (kind='fraction', value=-3" in res.stderr
    assert "fraction budget must be in (0, 1]" in res.stderr and HINT in res.stderr
    assert "Traceback" not in res.stderr and 'File "' not in res.stderr
    # the message, the failing job's overrides and Hydra's hint: nothing else
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 4, res.stderr
    assert not (tmp_path / "out" / "cache").exists()  # nothing was run


def test_hydra_full_error_shows_the_traceback(tmp_path):
    res = _grads(tmp_path, "budget.value=-3", HYDRA_FULL_ERROR="1")
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "grads.config.ConfigError" in res.stderr
    assert "fraction budget must be in (0, 1]" in res.stderr


def test_an_unknown_key_and_a_bad_selector_rule_are_named_without_a_traceback(tmp_path):
    res = _grads(tmp_path, "+foo=1", "selector.rule=bogus")
    assert res.returncode == 1
    assert "foo: unknown key" in res.stderr
    assert "rule must be one of" in res.stderr and "'bogus'" in res.stderr
    assert "Traceback" not in res.stderr


def test_grads_select_missing_pool_file_is_one_message(tmp_path):
    missing = tmp_path / "no_such_pool.jsonl"
    res = _grads(
        tmp_path,
        "domain=custom",
        f"domain.path={missing}",
        script="grads-select",
        module="grads.cli.select",
    )
    assert res.returncode == 1
    assert str(missing) in res.stderr and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------------
# errors raised inside the run (a stage reading a bad record, a bug)
# --------------------------------------------------------------------------------------------------
RAISING_RUN = """
import sys
import grads.pipeline
from grads.data.readers import BadRecordError

WHAT = sys.argv[1]

def run(cfg):
    if WHAT == "bad-record":
        raise BadRecordError("pool.jsonl", 6, "output", "empty string", kind="empty_field")
    if WHAT == "missing-file":
        open("/nonexistent/adapter.safetensors")
    raise RuntimeError("an unexpected bug")

grads.pipeline.run = run
from grads.{module} import main
sys.argv = ["grads", "model=tiny", "logger=none"]
main()
"""


@pytest.mark.parametrize(
    ("module", "what"),
    [
        ("cli.main", "bad-record"),
        ("cli.main", "missing-file"),
        ("cli.main", "bug"),
        ("cli.select", "bad-record"),
        ("cli.select", "bug"),
    ],
)
def test_errors_raised_during_the_run(tmp_path, module, what):
    code = RAISING_RUN.replace("{module}", module)
    res = _run([sys.executable, "-c", code, what], tmp_path)
    assert res.returncode == 1
    if what == "bug":  # not a user error: Hydra's traceback, as before
        assert "Traceback" in res.stderr and "RuntimeError: an unexpected bug" in res.stderr
        return
    expected = {
        "bad-record": "pool.jsonl, row 6, field 'output'",
        "missing-file": "No such file or directory: /nonexistent/adapter.safetensors",
    }[what]
    assert expected in res.stderr and HINT in res.stderr
    assert "Traceback" not in res.stderr
    full = _run([sys.executable, "-c", code, what], tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_which_exceptions_are_user_errors():
    from grads.config import ConfigError
    from grads.data.heldout import HeldoutConfigError
    from grads.data.readers import BadRecordError
    from grads.data.targets import TargetConfigError
    from grads.evaluation.settings import TaskConfigError
    from grads.selectors.budget import BudgetError, parse_budget

    for cls in (ConfigError, BadRecordError, TaskConfigError, HeldoutConfigError, BudgetError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)  # callers' excepts hold
    assert issubclass(TargetConfigError, UserError)
    assert is_user_error(FileNotFoundError(2, "No such file or directory", "x"))
    assert not is_user_error(ValueError("a bug")) and not is_user_error(KeyError("k"))
    assert UserError in USER_ERRORS
    with pytest.raises(BudgetError, match="asks for 100 samples but the pool has only 60"):
        parse_budget("n100").resolve(60)


# --------------------------------------------------------------------------------------------------
# grads-cache, grads-report
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["ls", "verify"])
def test_grads_cache_on_a_missing_root_fails(tmp_path, cmd):
    missing = tmp_path / "nonexistent"
    res = _run([*_script("grads-cache", "grads.cli.cache"), "--root", str(missing), cmd], tmp_path)
    assert res.returncode == 1 and "0 entries" not in res.stdout
    assert f"grads-cache: error: no cache folder at {missing}" in res.stderr
    assert "Traceback" not in res.stderr


def test_grads_report_user_errors(tmp_path):
    report = _script("grads-report", "grads.paper.tables")
    res = _run([*report, str(tmp_path / "no_sweep")], tmp_path)
    assert res.returncode == 1 and "no such folder" in res.stderr
    res = _run([*report, "--from-csv", str(tmp_path / "missing.csv")], tmp_path)
    assert res.returncode == 1 and "missing.csv" in res.stderr and "Traceback" not in res.stderr
    res = _run([*report, "-v", "--from-csv", str(tmp_path / "missing.csv")], tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr  # -v: the traceback


# --------------------------------------------------------------------------------------------------
# Budget labels
# --------------------------------------------------------------------------------------------------
def _budget(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(list(overrides)), resolve=True)["budget"]


def test_budget_label_follows_the_value_used():
    from hydra.utils import instantiate

    assert _budget("budget=n100", "budget.value=15")["name"] == "n15"
    assert _budget("budget=p10", "budget.value=0.15")["name"] == "p15"
    assert _budget("budget=p5", "budget.kind=count", "budget.value=7")["name"] == "n7"
    assert _budget("budget=n100", "budget.value=15", "budget.name=small")["name"] == "small"
    built = instantiate(compose(["budget=n100", "budget.value=15"]).budget)
    assert (built.value, built.name, built.to_dict()["name"]) == (15, "n15", "n15")


def test_budget_files_keep_their_labels():
    """Every conf/budget file's label is its file name, so the cache keys hashing it are unchanged
    (tests/stage_keys.json pins them)."""
    names = sorted(p.stem for p in (REPO / "conf" / "budget").glob("*.yaml"))
    assert names and all(_budget(f"budget={n}")["name"] == n for n in names)


# --------------------------------------------------------------------------------------------------
# Progress of the representation passes
# --------------------------------------------------------------------------------------------------
def _rows(n: int) -> list[dict]:
    return [
        {"id": f"s{i}", "input_ids": [5 + i, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}
        for i in range(n)
    ]


def test_representation_passes_show_progress(tiny, capsys):
    from peft import LoraConfig, get_peft_model

    from grads.features.representations import (
        Projector,
        hidden_matrix,
        lora_grad_matrix,
        lora_parameters,
    )
    from grads.models import build_tiny

    model, tok = tiny
    hidden_matrix(model, _rows(10), tok.pad_token_id, batch_size=4, progress="RDS+ hidden (pool)")
    err = capsys.readouterr().err
    assert "RDS+ hidden (pool)" in err and "10/10" in err
    lora = get_peft_model(build_tiny(tied=True)[0], LoraConfig(r=2, target_modules=["q_proj"]))
    proj = Projector([p.numel() for _, p in lora_parameters(lora)], 16, "countsketch", seed=0)
    lora_grad_matrix(lora, _rows(6), tok.pad_token_id, proj, batch_size=4, progress="LESS (pool)")
    err = capsys.readouterr().err
    assert "LESS (pool)" in err and "6/6" in err
    hidden_matrix(model, _rows(3), tok.pad_token_id)  # progress=None: no bar
    assert "3/3" not in capsys.readouterr().err


def test_progress_bars_follow_features_progress_and_rank(monkeypatch):
    from grads.features.representations import _bar_label

    # grads.dist.rank, not RANK: an earlier in-process test may have left a process group up
    monkeypatch.setattr("grads.dist.rank", lambda: 0)
    assert _bar_label({"features": {"progress": True}}, "RDS+")("target") == "RDS+ (target)"
    assert _bar_label({"features": {"progress": False}}, "RDS+")("pool") is None
    monkeypatch.setattr("grads.dist.rank", lambda: 1)
    assert _bar_label({"features": {"progress": True}}, "RDS+")("pool") is None
