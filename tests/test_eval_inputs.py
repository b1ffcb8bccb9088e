"""The evaluate stage's key covers every file a user's lm-eval task reads: ``dataset_path: json``
with ``data_files`` (a string, a list or a dict of splits, relative to the working directory or to
``data_dir``, glob patterns), a local ``dataset_path`` folder, and files reached through ``include``
chains. Editing any of them re-runs the evaluation; nothing else is invalidated."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grads.constants import STAGES
from grads.pipeline import job_identities, run
from tests.conftest import compose

# The tiny model on the smoke experiment, evaluated on the user's task alone (no loss parts).
TINY = [
    "experiment=smoke",
    "model=tiny",
    "logger=none",
    "domain.pool_limit=40",
    "data.max_seq_len=64",
    "trainer.micro_batch_size=8",
    "warmup.max_steps=2",
    "finetune.max_steps=2",
    "features.batch_size=8",
    "eval.limit=null",
    "eval.task_limits=null",
    "eval.general_tasks=[]",
    "domain.eval_tasks_general=[]",
    "eval.domain_loss_tasks=[]",
    "eval.ref_tasks=[]",
    "eval.text_tasks=[]",
    "eval.kl_task=null",
    "eval.batch_size=16",
]

QUESTIONS = [
    ("Is ice cold?", 1),
    ("Can pigs fly?", 0),
    ("Is the sun a star?", 1),
    ("Is water dry?", 0),
    ("Do fish swim?", 1),
    ("Is fire wet?", 0),
    ("Are cats animals?", 1),
    ("Is a stone alive?", 0),
]

TASK = """task: {name}
{source}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: ["no", "yes"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _gold(path: Path, flip: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "label": 1 - a if flip else a} for q, a in QUESTIONS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task(folder: Path, name: str, source: str, file: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (file or f"{name}.yaml")
    path.write_text(TASK.format(name=name, source=source))
    return path


def _run(out: Path, overrides: list[str]) -> dict:
    cwd = os.getcwd()
    os.chdir(out)  # data_files relative to the working directory, as datasets reads them
    try:
        return run(compose([f"paths.output_dir={out}", f"paths.cache_dir={out}/cache", *overrides]))
    finally:
        os.chdir(cwd)


def test_editing_data_files_reruns_only_the_evaluation(tmp_path):
    """The documented ``dataset_path: json`` form: the gold answers change, the score follows."""
    tasks = tmp_path / "my_tasks"
    src = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/gold.jsonl"
    _task(tasks, "my_gold", src)
    _gold(tmp_path / "data" / "gold.jsonl")
    ov = [*TINY, f"eval.include_paths=[{tasks}]", "domain.eval_tasks=[my_gold]"]
    first = _run(tmp_path, ov)
    assert first["cache_misses"] == list(STAGES)
    _gold(tmp_path / "data" / "gold.jsonl", flip=True)
    again = _run(tmp_path, ov)
    assert again["cache_hits"] == [s for s in STAGES if s != "evaluate"]
    assert again["cache_misses"] == ["evaluate"]
    assert again["keys"]["evaluate"] != first["keys"]["evaluate"]
    # every answer flipped on a two-choice task: each hit becomes a miss and the reverse
    assert again["domain_acc"] == pytest.approx(1 - first["domain_acc"], abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Which edits change the key (no run: keys only)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def keys(tmp_path, monkeypatch):
    """Stage keys of the smoke config with the user's task folder, computed from ``tmp_path``."""
    monkeypatch.chdir(tmp_path)

    def of(task: str, folder: Path | None = None) -> dict[str, str]:
        cfg = compose(
            [
                "experiment=smoke",
                f"paths.cache_dir={tmp_path}/cache",
                f"eval.include_paths=[{folder or tmp_path / 'tasks'}]",
                f"domain.eval_tasks=[{task}]",
            ]
        )
        resolved = OmegaConf.to_container(cfg, resolve=True)
        return {s: i.key for s, i in job_identities(resolved, STAGES).items()}

    return of


def _changed(a: dict, b: dict) -> list[str]:
    return [s for s in STAGES if a[s] != b[s]]


@pytest.mark.parametrize(
    ("data_files", "edited"),
    [
        ("data/gold.jsonl", "data/gold.jsonl"),  # a string, relative to the working directory
        ("[data/a.jsonl, data/gold.jsonl]", "data/gold.jsonl"),  # a list
        ("{train: data/a.jsonl, test: data/gold.jsonl}", "data/gold.jsonl"),  # splits
        ("{test: 'data/*.jsonl'}", "data/gold.jsonl"),  # a glob pattern
        ("{test: 'data/*.jsonl'}", "data/new.jsonl"),  # ... a file added to it
    ],
)
def test_every_data_files_form_is_keyed(tmp_path, keys, data_files, edited):
    _gold(tmp_path / "data" / "gold.jsonl")
    _gold(tmp_path / "data" / "a.jsonl")
    src = f"dataset_path: json\ndataset_kwargs:\n  data_files: {data_files}"
    _task(tmp_path / "tasks", "t", src)
    before = keys("t")
    _gold(tmp_path / edited, flip=True)
    assert _changed(before, keys("t")) == ["evaluate"]


def test_data_files_under_data_dir_and_absolute(tmp_path, keys):
    """``data_dir`` is the base of relative ``data_files``; an absolute path needs no base."""
    _gold(tmp_path / "d" / "gold.jsonl")
    _gold(tmp_path / "abs.jsonl")
    src = "dataset_path: json\ndataset_kwargs:\n  data_dir: d\n  data_files: {test: gold.jsonl}"
    _task(tmp_path / "tasks", "rel", src)
    src = f"dataset_path: json\ndataset_kwargs:\n  data_files: {tmp_path / 'abs.jsonl'}"
    _task(tmp_path / "tasks", "abs", src)
    before = {t: keys(t) for t in ("rel", "abs")}
    _gold(tmp_path / "d" / "gold.jsonl", flip=True)
    _gold(tmp_path / "abs.jsonl", flip=True)
    for t in ("rel", "abs"):
        assert _changed(before[t], keys(t)) == ["evaluate"], t


def test_a_local_dataset_folder_is_keyed(tmp_path, keys):
    _gold(tmp_path / "my_set" / "test.jsonl")
    _task(tmp_path / "tasks", "t", "dataset_path: my_set")
    before = keys("t")
    _gold(tmp_path / "my_set" / "test.jsonl", flip=True)
    assert _changed(before, keys("t")) == ["evaluate"]


def test_files_named_through_an_include_chain_are_keyed(tmp_path, keys):
    """``include`` as a list, and an absolute include outside the task folder, as lm-eval reads
    them; the data file named only in the included template is keyed too."""
    shared = tmp_path / "shared"
    src = "dataset_path: json\ndataset_kwargs:\n  data_files: {test: data/gold.jsonl}"
    base = _task(shared, "unused", src, file="base.yaml")
    base.write_text(base.read_text().replace("task: unused\n", ""))  # a template: no task name
    (shared / "extra.yaml").write_text("num_fewshot: 0\n")
    (tmp_path / "tasks").mkdir()
    leaf = tmp_path / "tasks" / "t.yaml"
    leaf.write_text(f"include: [{base}, {shared / 'extra.yaml'}]\ntask: t\n")
    _gold(tmp_path / "data" / "gold.jsonl")
    before = keys("t")
    (shared / "extra.yaml").write_text("num_fewshot: 1\n")
    after_include = keys("t")
    assert _changed(before, after_include) == ["evaluate"]
    _gold(tmp_path / "data" / "gold.jsonl", flip=True)
    assert _changed(after_include, keys("t")) == ["evaluate"]


def test_moving_a_user_task_with_its_data_keeps_the_key(tmp_path, keys, monkeypatch):
    """No absolute path enters the key: a project folder moved whole keeps its evaluate key."""
    src = "dataset_path: json\ndataset_kwargs:\n  data_files: {test: data/gold.jsonl}"
    for root in (tmp_path / "a", tmp_path / "b"):
        _task(root / "tasks", "t", src)
        _gold(root / "data" / "gold.jsonl")
    monkeypatch.chdir(tmp_path / "a")
    first = keys("t", tmp_path / "a" / "tasks")
    monkeypatch.chdir(tmp_path / "b")
    assert keys("t", tmp_path / "b" / "tasks") == first
