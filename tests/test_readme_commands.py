"""The README's commands, read out of README.md and run as a user types them.

Every command in the ```bash blocks of the sections "Your own pool: take the subset", "Is the
subset better than random on my pool?", "Hyperparameter sweeps (Optuna)" and "Sharing results: W&B
reports" is listed below with how it is
checked; :func:`test_every_readme_command_is_checked` fails when the README gains, loses or changes
a command without this file following. Each command runs through ``bash`` in a temporary folder
holding the hand-written ``pool.jsonl`` (so the relative path works as typed), with the stage cache
and outputs under that folder (``GRADS_OUTPUT_DIR``). What the test adds or substitutes, and why:

* ``model=tiny`` is appended to every ``grads`` / ``grads-select`` run (a real model is slow on CPU).
* ``hydra.sweeper.n_trials=30`` (and the 16 trials of ``hpo_*``) becomes ``hydra.sweeper.n_trials=2``.
* The hub-model command (``model=qwen2_5_1_5b_instruct trainer=zero2``: a download and GPUs) is
  composed and validated as written, then run with ``model=tiny trainer=cpu`` in their place.
* ``wandb login`` needs the network: its argument parsing is checked (``--help``).
* ``wandb sync`` needs the network: it runs with ``--dry-run``, on the offline runs the custom-pool
  sweep wrote (the same ``outputs/wandb/offline-run-*`` glob, relative to the output folder).
* ``scripts/wandb_report.py --dry-run`` runs as written (offline); the saving one runs in-process
  with ``Report.save`` replaced by a recorder (saving needs the network).

The default suite runs the custom-pool commands (Alpaca fields and a ``messages`` pool, no
templates), the custom-pool sweep and the W&B commands; the sweeps on the synthetic domain are
composed and their objective checked here, and run end to end under ``-m slow``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, compose

SECTIONS = (
    "Your own pool: take the subset",
    "Is the subset better than random on my pool?",
    "Hyperparameter sweeps (Optuna)",
    "Sharing results: W&B reports",
)
# The commands, as the README writes them (comments dropped, whitespace normalised).
SELECT = "grads-select domain=custom domain.path=pool.jsonl budget=p10 export.dir=my_subset"
SELECT_HUB = (
    "grads-select domain=custom domain.path=pool.jsonl model=qwen2_5_1_5b_instruct "
    "trainer=zero2 budget=p5"
)
VERDICT = "grads-verdict domain=custom domain.path=pool.jsonl verdict.selectors=[grads,grads_paper]"
HPO = "grads -m experiment=hpo_finetune"
HPO_CUSTOM = (
    "grads -m experiment=hpo_finetune domain=custom domain.path=pool.jsonl "
    "hydra.sweeper.n_trials=30"
)
HPO_ACC = (
    "grads -m experiment=hpo_finetune objective.metric=domain_acc objective.direction=maximize"
)
HPO_PARETO = "grads -m experiment=hpo_pareto"
HPO_SQLITE = "grads -m experiment=hpo_finetune hydra.sweeper.storage=sqlite:///hpo.db"
WANDB_LOGIN = "wandb login"
WANDB_SYNC = "wandb sync --entity ME --project grads outputs/wandb/offline-run-*"
REPORT_DRY = (
    "python scripts/wandb_report.py --entity ME --project grads --group hpo_finetune --dry-run"
)
REPORT_SAVE = "python scripts/wandb_report.py --entity ME --project grads --group hpo_finetune"
CHECKED = {
    SELECT: "run (+ model=tiny) on an Alpaca-field pool and on a messages pool",
    SELECT_HUB: "composed + validated as written; run with model=tiny trainer=cpu",
    VERDICT: "run (+ model=tiny verdict.seeds=2) on the Alpaca pool: a paired CI per selector",
    HPO: "composed, objective checked; slow: 2 trials with model=tiny",
    HPO_CUSTOM: "run: 2 trials with model=tiny",
    HPO_ACC: "composed, objective checked; slow: 2 trials with model=tiny",
    HPO_PARETO: "composed, objective checked; slow: 2 trials with model=tiny",
    HPO_SQLITE: "composed; slow: 1 trial, then 1 more resumed from hpo.db",
    WANDB_LOGIN: "network: --help only",
    WANDB_SYNC: "network: --dry-run on the custom sweep's offline runs",
    REPORT_DRY: "run as written (offline)",
    REPORT_SAVE: "network: in-process with Report.save recorded",
}
TINY = ["model=tiny"]
TWO_TRIALS = "hydra.sweeper.n_trials=2"
N_ALPACA, N_CHAT = 60, 40


# --------------------------------------------------------------------------------------------------
# Reading the README
# --------------------------------------------------------------------------------------------------
def readme_commands(text: str | None = None) -> dict[str, list[str]]:
    """Section title -> the commands of its ```bash blocks (continuations joined, comments off)."""
    text = text if text is not None else (REPO / "README.md").read_text(encoding="utf-8")
    out: dict[str, list[str]] = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        if title.strip() not in SECTIONS:
            continue
        commands = []
        for code in re.findall(r"^```bash\n(.*?)^```", body, flags=re.M | re.S):
            for line in code.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append(" ".join(words))
        out[title.strip()] = commands
    return out


def test_readme_parser_joins_continuations_and_drops_comments():
    text = "## Hyperparameter sweeps (Optuna)\n```bash\n# a comment\ngrads -m a=1 \\\n  b=2  # c\n```\n"
    assert readme_commands(text) == {"Hyperparameter sweeps (Optuna)": ["grads -m a=1 b=2"]}


def test_every_readme_command_is_checked():
    found = readme_commands()
    assert set(found) == set(SECTIONS), f"README sections missing: {set(SECTIONS) - set(found)}"
    listed = [c for cs in found.values() for c in cs]
    assert sorted(listed) == sorted(CHECKED), (
        "README commands and this test's list differ: "
        f"new in README {sorted(set(listed) - set(CHECKED))}, "
        f"gone from README {sorted(set(CHECKED) - set(listed))}"
    )
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "need the network" in readme  # the README says which commands need it


# --------------------------------------------------------------------------------------------------
# Running a command as typed
# --------------------------------------------------------------------------------------------------
def _words(command: str, extra: list[str], swap: dict[str, str]) -> str:
    """The bash line: the README's words (``swap`` replaces whole words), then ``extra``."""
    words = [swap.get(w, w) for w in shlex.split(command)] + extra
    return " ".join(w if "*" in w else shlex.quote(w) for w in words)  # a glob stays a glob


def run(
    command: str,
    cwd: Path,
    out: Path,
    extra: list[str] = (),
    swap: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a README command with bash in ``cwd``; outputs and the stage cache go to ``out``.

    The environment's console scripts (``grads``, ``grads-select``, ``wandb``, ``python``) come
    first on PATH and import this checkout (PYTHONPATH), as after ``pip install -e .``.
    """
    assert command in CHECKED, command
    bindir = Path(sys.executable).parent
    full_env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "GRADS_OUTPUT_DIR": str(out),
        "HYDRA_FULL_ERROR": "1",
        **(env or {}),
    }
    missing = [s for s in ("grads", "grads-select", "grads-verdict") if not (bindir / s).exists()]
    line = _words(command, list(extra), swap or {})
    scripts = (("grads-select", "grads.cli.select"), ("grads-verdict", "grads.cli.verdict"),
               ("grads", "grads.cli.main"))  # fmt: skip
    for script, module in scripts:
        if script in missing and line.startswith(script + " "):  # not installed: same entry point
            line = f"{shlex.quote(sys.executable)} -m {module} {line[len(script) + 1 :]}"
    return subprocess.run(
        ["bash", "-c", line],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"{res.args}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def alpaca_rows(n: int = N_ALPACA) -> list[dict]:
    """Alpaca fields (instruction / input / output), every third ``input`` empty."""
    return [
        {
            "instruction": f"Summarise the maintenance note for pump P{i}.",
            "input": "" if i % 3 == 0 else f"P{i} vibrates above {20 + i} Hz after {i % 7 + 1} h.",
            "output": f"Pump P{i}: check the bearings; vibration limit {20 + i} Hz.",
        }
        for i in range(n)
    ]


def chat_rows(n: int = N_CHAT) -> list[dict]:
    """``messages`` records, some with a system turn and two user turns."""
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"How many legs do {i} spiders have?"}]
        if i % 4 == 0:
            turns = [
                {"role": "system", "content": "Answer with a number and one sentence."},
                *turns,
                {"role": "assistant", "content": "Which spiders?"},
                {"role": "user", "content": "Ordinary garden spiders."},
            ]
        turns.append({"role": "assistant", "content": f"{8 * i} legs: {i} spiders with 8 each."})
        rows.append({"messages": turns})
    return rows


def _write_pool(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    return _write_pool(tmp_path_factory.mktemp("readme_alpaca"), alpaca_rows())


@pytest.fixture(scope="module")
def alpaca_select(alpaca) -> subprocess.CompletedProcess:
    return _ok(run(SELECT, alpaca, alpaca / "outputs", extra=TINY))


def _check_export(folder: Path, n_pool: int, fields: list[str], budget: float) -> list[dict]:
    """The export of ``export.dir=my_subset``: files, rows, fields; returns the JSONL rows."""
    from datasets import load_from_disk

    k = math.ceil(budget * n_pool)
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["rows"] == k and manifest["pool_size"] == n_pool
    rows = [json.loads(x) for x in (folder / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == k and [r["rank"] for r in rows] == list(range(k))
    for r in rows:
        assert list(r)[: len(fields)] == fields and {"id", "score", "rank"} <= set(r)
    ds = load_from_disk(str(folder / "selected"))  # as the README's Python snippet reads it
    assert ds.num_rows == k and ds["id"] == [r["id"] for r in rows]
    assert ds.column_names[: len(fields)] == fields
    return rows


def test_select_on_an_alpaca_pool_without_templates(alpaca, alpaca_select):
    rows = _check_export(alpaca / "my_subset", N_ALPACA, ["instruction", "input", "output"], 0.1)
    originals = {r["instruction"]: r for r in alpaca_rows()}
    for r in rows:  # the original record, unchanged
        assert {f: r[f] for f in ("instruction", "input", "output")} == originals[r["instruction"]]
    pool = json.loads((alpaca / "my_subset" / "export.json").read_text())["pool"]
    assert (pool["mode"], pool["prompt"], pool["response"]) == (
        "template",
        "{instruction}\n{input}",
        "{output}",
    )


def test_select_on_a_messages_pool_without_templates(tmp_path):
    work = _write_pool(tmp_path, chat_rows())
    _ok(run(SELECT, work, work / "outputs", extra=TINY))
    rows = _check_export(work / "my_subset", N_CHAT, ["messages"], 0.1)
    by_text = {json.dumps(r["messages"]): r for r in chat_rows()}
    assert all(json.dumps(r["messages"]) in by_text for r in rows)  # the turns, as they were
    pool = json.loads((work / "my_subset" / "export.json").read_text())["pool"]
    assert (pool["mode"], pool["messages_field"]) == ("chat", "messages")


def test_select_with_a_hub_model_composes_and_runs_on_the_tiny_model(alpaca, alpaca_select):
    from grads.cli.select import SELECT_STAGES
    from grads.config import compose_resolved

    over = shlex.split(SELECT_HUB)[1:]
    cwd = Path.cwd()
    os.chdir(alpaca)  # domain.path=pool.jsonl is relative to where the command is typed
    try:
        cfg = compose_resolved([*over, f"stages=[{','.join(SELECT_STAGES)}]"])
    finally:
        os.chdir(cwd)
    assert cfg["model"]["hub_id"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (cfg["trainer"]["name"], cfg["budget"]["name"]) == ("zero2", "p5")
    assert cfg["domain"]["sources"][0]["path"] == str(alpaca / "pool.jsonl")
    assert cfg["domain"]["heldout"] is None  # grads-select: every record is a candidate
    swap = {"model=qwen2_5_1_5b_instruct": "model=tiny", "trainer=zero2": "trainer=cpu"}
    _ok(run(SELECT_HUB, alpaca, alpaca / "outputs", swap=swap))
    # The same pool and model as the p10 command: only the select stage runs again.
    runs = sorted((alpaca / "outputs" / "runs").rglob("metrics.json"), key=os.path.getmtime)
    metrics = json.loads(runs[-1].read_text())
    assert (metrics["budget"], metrics["n_pool"], metrics["n_selected"]) == ("p5", N_ALPACA, 3)
    assert metrics["cache_hits"] == ["warmup", "features"]


# --------------------------------------------------------------------------------------------------
# Hyperparameter sweeps
# --------------------------------------------------------------------------------------------------
def _sweep_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in (out / "multirun").rglob("optimization_results.yaml"))


@pytest.fixture(scope="module")
def hpo_custom(alpaca) -> tuple[Path, subprocess.CompletedProcess]:
    out = alpaca / "outputs"
    # W&B as configured (offline runs under outputs/wandb/), for the `wandb sync` command below.
    res = run(
        HPO_CUSTOM,
        alpaca,
        out,
        extra=TINY,
        swap={"hydra.sweeper.n_trials=30": TWO_TRIALS},
        env={"WANDB_MODE": "offline"},
    )
    return out, _ok(res)


def test_hpo_on_a_custom_pool_runs_two_trials_on_the_held_out_bpb(hpo_custom):
    out, _ = hpo_custom
    (sweep,) = _sweep_dirs(out)
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("[0-9]*/metrics.json"))]
    assert len(trials) == 2
    held = math.floor(0.05 * N_ALPACA)  # conf/domain/custom.yaml: 5 % of the samples, <= 300
    for m in trials:
        assert m["domain"] == "custom" and isinstance(m["domain_bpb"], float)
        assert m["n_pool"] == N_ALPACA - held and m["data"]["heldout_for_domain_loss"] == held
        assert "domain_acc" not in m or m["domain_acc"] is None  # no domain tasks of its own
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == min(m["domain_bpb"] for m in trials)
    # One warm-up for the study: the second trial reads it from the cache.
    assert trials[0]["keys"]["warmup"] == trials[1]["keys"]["warmup"]
    assert "warmup" in trials[1]["cache_hits"]


@pytest.mark.parametrize("command", [HPO, HPO_ACC, HPO_PARETO, HPO_SQLITE])
def test_synthetic_sweeps_compose_with_an_objective_the_run_produces(command):
    from grads.objective import ObjectiveCheck, check_objective, producible

    cfg = compose(shlex.split(command)[2:], return_hydra_config=True)
    metrics, directions = check_objective(cfg)
    assert set(metrics) <= set(producible(cfg))
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)["direction"]
    assert (sweeper if isinstance(sweeper, list) else [sweeper]) == directions
    ObjectiveCheck().on_multirun_start(cfg)  # what the sweep runs before its first trial


@pytest.mark.slow
@pytest.mark.parametrize("command", [HPO, HPO_ACC, HPO_PARETO])
def test_synthetic_sweeps_run_two_trials(command, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "readme_synthetic"  # one warm-up for all three
    work.mkdir(exist_ok=True)
    before = set(_sweep_dirs(work / "outputs"))
    _ok(run(command, work, work / "outputs", extra=[*TINY, TWO_TRIALS]))
    (sweep,) = set(_sweep_dirs(work / "outputs")) - before
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("[0-9]*/metrics.json"))]
    assert len(trials) == 2
    if command == HPO_PARETO:
        assert results.solutions and {"domain_bpb", "general_kl"} <= set(trials[0])
    else:
        key, pick = ("domain_acc", max) if command == HPO_ACC else ("domain_bpb", min)
        assert results.best_value == pick(m[key] for m in trials)


@pytest.mark.slow
def test_sqlite_study_resumes(tmp_path):
    import optuna

    for _ in range(2):
        _ok(
            run(
                HPO_SQLITE,
                tmp_path,
                tmp_path / "outputs",
                extra=[*TINY, "hydra.sweeper.n_trials=1"],
            )
        )
    study = optuna.load_study(study_name="hpo_finetune", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    assert len(study.trials) == 2


# --------------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------------
def test_wandb_login_parses(tmp_path):
    res = _ok(run(WANDB_LOGIN, tmp_path, tmp_path, extra=["--help"]))
    assert "Usage: wandb login" in res.stdout


def test_wandb_sync_finds_the_offline_runs_of_the_sweep(alpaca, hpo_custom):
    res = _ok(run(WANDB_SYNC, alpaca, alpaca / "outputs", extra=["--dry-run"]))
    runs = sorted((alpaca / "outputs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one per trial
    assert "Would sync 2 run(s)" in res.stdout + res.stderr


def test_wandb_report_dry_run_prints_the_outline(tmp_path):
    res = _ok(run(REPORT_DRY, REPO, tmp_path))
    out = res.stdout
    assert "report: GrADS sweep: hpo_finetune (ME/grads)" in out
    assert "Objective: domain_bpb" in out  # the sweeps' default objective
    for head in ("Results", "Hyperparameters", "Selection", "Cost"):
        assert f"H1: {head}" in out


def test_wandb_report_save_calls_save_and_prints_the_url(monkeypatch, capsys):
    import importlib.util

    from wandb_workspaces.reports.v2 import interface

    saved = []
    monkeypatch.setattr(interface.Report, "save", lambda self, *a, **k: saved.append(self))
    monkeypatch.setattr(
        interface.Report, "url", property(lambda self: f"https://wandb.ai/{self.entity}/r")
    )
    words = shlex.split(REPORT_SAVE)
    spec = importlib.util.spec_from_file_location("wandb_report", REPO / words[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(words[2:])
    (report,) = saved
    assert (report.entity, report.project) == ("ME", "grads")
    assert "report saved: https://wandb.ai/ME/r" in capsys.readouterr().out


def test_verdict_on_an_alpaca_pool_pairs_each_selector_with_random(alpaca):
    """The README's verdict command: both selectors judged against random on the same seeds, each
    with a paired CI on held-out bpb and KL and a verdict in words."""
    out = alpaca / "verdict_out"
    _ok(run(VERDICT, alpaca, out, extra=[*TINY, "verdict.seeds=2"]))
    report = json.loads(next((out / "runs").rglob("verdict.json")).read_text())
    assert [r["selector"] for r in report["selectors"]] == ["grads", "grads_paper"]
    assert report["seeds"] == [0, 1] and report["cache"]["all_shared"]
    for row in report["selectors"]:
        words = ("beats random", "ties random", "worse than random", "inconclusive")
        assert row["loss_verdict"] in words
        for metric in ("domain_bpb", "general_kl"):
            ci = row[metric]
            assert ci["lo"] <= ci["diff"] <= ci["hi"] and ci["n_seeds"] == 2
