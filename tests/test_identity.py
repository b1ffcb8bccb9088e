"""grads.identity: which change invalidates which stage, content fingerprints of data and task files,
one trainer identity for stage keys and resume fingerprints, and a base-eval key without paths."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from grads.constants import STAGES
from grads.evaluation.identity import base_eval_identity
from grads.hashing import NON_SEMANTIC, Fingerprints, digest
from grads.identity import DOMAIN_EVAL_FIELDS, KEYED_SECTIONS
from grads.pipeline import job_identities
from grads.training.identity import resume_fingerprint, trainer_identity
from tests.conftest import CONF_DIR, compose

BASE = ["experiment=smoke", "warmup.seed=0"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


_MEMO: dict[tuple, dict] = {}


@pytest.fixture
def keys_of(shared_cache):
    """Stage keys of the smoke config plus overrides; the cache (and generated data) in tmp.

    The tests that never edit a file share one cache, and the keys of the unchanged config are
    computed once (composing a config is the slow part).
    """

    def keys(*overrides: str, cache: Path | None = None) -> dict[str, str]:
        if not overrides and cache is None and shared_cache in _MEMO:
            return _MEMO[shared_cache]
        cfg = compose([f"paths.cache_dir={cache or shared_cache}", *BASE, *overrides])
        resolved = OmegaConf.to_container(cfg, resolve=True)
        out = {s: i.key for s, i in job_identities(resolved, STAGES).items()}
        if not overrides and cache is None:
            _MEMO[shared_cache] = out
        return out

    return keys


def _changed(a: dict, b: dict) -> list[str]:
    return [s for s in STAGES if a[s] != b[s]]


# Override -> the first stage it invalidates (every later stage chains from it).
SEMANTIC = [
    ("model.hidden_size=32", "warmup"),
    ("data.max_seq_len=80", "warmup"),
    ("data.dedup=false", "warmup"),
    ("domain.pool_limit=100", "warmup"),
    ("trainer.lr=5e-4", "warmup"),
    ("trainer.lora.dropout=0.1", "warmup"),
    ("trainer.micro_batch_size=4", "warmup"),  # global batch 8 -> 4
    ("trainer.procs=2", "warmup"),  # global batch 8 -> 16
    ("trainer.dtype=bf16", "warmup"),
    ("trainer.autocast=true", "warmup"),  # keyed only when on (test_key_stability: off = old keys)
    ("trainer=zero2", "warmup"),  # another DeepSpeed template
    ("warmup.max_steps=3", "warmup"),
    ("features.stats=false", "features"),
    ("features.ifd_answer=matched", "features"),  # keyed only away from `text` (LATE_KNOBS)
    ("selector=random", "select"),
    ("budget=p10", "select"),
    ("seed=1", "select"),  # warmup.seed is pinned: warm-up and features are shared
    ("finetune.epochs=2", "finetune"),
    ("+finetune.lr=1e-4", "finetune"),
    ("+finetune.save_merged=true", "finetune"),
    ("eval.limit=8", "evaluate"),
    ("eval.num_fewshot=1", "evaluate"),
    ("eval=none", "evaluate"),
]

NON_SEMANTIC_OVERRIDES = [
    "trainer.save_every=7",
    "trainer.log_every=5",
    "trainer.keep_checkpoints=3",
    "trainer.clean_checkpoints=false",
    "trainer.gradient_checkpointing=true",
    "+trainer.stop_after_steps=1",
    "features.batch_size=3",
    "features.procs=2",
    "eval.batch_size=3",
    "eval.general_tasks_hub=[arc_easy]",  # read only with eval.tasks_from=hub
    "data.num_proc=4",
    "domain.hub_datasets=[{hub_id: x/y}]",
    "logger=wandb_offline",
    "group=other",
    "tags=[a,b]",
    "stages=[warmup]",
    "paths.output_dir=/elsewhere",
]


@pytest.mark.parametrize(("override", "first"), SEMANTIC)
def test_each_change_invalidates_its_stage_and_the_later_ones(keys_of, override, first):
    assert _changed(keys_of(), keys_of(override)) == list(STAGES[STAGES.index(first) :])


@pytest.mark.parametrize("override", NON_SEMANTIC_OVERRIDES)
def test_non_semantic_knobs_keep_every_key(keys_of, override):
    assert _changed(keys_of(), keys_of(override)) == []


def test_moving_the_cache_keeps_the_keys(keys_of, tmp_path):
    # The synthetic domain is generated inside the cache: its content is keyed, not its path.
    assert keys_of(cache=tmp_path / "a") == keys_of(cache=tmp_path / "b" / "c")


def test_budget_free_selector_ignores_the_budget(keys_of):
    assert keys_of("selector=full", "budget=p10")["select"] == keys_of("selector=full")["select"]


def test_two_processes_share_the_key_of_one_when_they_reproduce_it(keys_of):
    """Same global batch (2 x 4 = 1 x 8): one key without dropout, two keys with LoRA dropout."""
    one = ["trainer.lora.dropout=0.0"]
    two = ["trainer.lora.dropout=0.0", "trainer.procs=2", "trainer.micro_batch_size=4"]
    assert keys_of(*one) == keys_of(*two)
    accum = ["trainer.lora.dropout=0.0", "trainer.grad_accum=2", "trainer.micro_batch_size=4"]
    assert keys_of(*one) == keys_of(*accum)
    drop = ["trainer.procs=2", "trainer.micro_batch_size=4"]  # smoke keeps dropout 0.05
    assert _changed(keys_of(), keys_of(*drop)) == list(STAGES)


# --------------------------------------------------------------------------------------------------
# Data content
# --------------------------------------------------------------------------------------------------
def _pool(path: Path, n: int, tag: str = "") -> None:
    rows = [{"prompt": f"question {i}{tag}", "response": f"answer {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pool_content_not_name_decides_the_keys(keys_of, tmp_path):
    pool = tmp_path / "data" / "pool.jsonl"
    pool.parent.mkdir()
    _pool(pool, 30)
    src = [
        f"domain.sources=[{{name: mine, path: {pool}, prompt: '{{prompt}}', response: '{{response}}'}}]",
        "domain.generator=null",
    ]
    first = keys_of(*src)
    assert keys_of(*src) == first  # unchanged file: same keys
    _pool(pool, 50, tag="!")  # rewritten in place: same name, new rows
    assert _changed(first, keys_of(*src)) == list(STAGES)
    other = tmp_path / "data" / "renamed.jsonl"
    shutil.copy(pool, other)  # same content under another name and folder
    assert keys_of(*[s.replace(str(pool), str(other)) for s in src]) == keys_of(*src)


def test_reader_sibling_files_are_keyed(tmp_path):
    """PubMedQA's reader also reads test_ground_truth.json next to its file."""
    cfg = compose(["domain=medical", f"paths.cache_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    pool = job_identities(resolved, ["warmup"])["warmup"].identity["pool"]
    pubmed = next(s for s in pool["sources"] if s["name"] == "pubmedqa_train")
    assert set(pubmed["reads"]) == {"test_ground_truth.json"}
    assert all("path" not in s for s in pool["sources"] + pool["decontaminate"])
    assert len(pool["decontaminate"]) == len(resolved["domain"]["decontaminate"])


def test_fingerprints_fast_path_and_changed_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    old = os.stat(f)
    os.utime(f, ns=(old.st_atime_ns, old.st_mtime_ns - 10**10))  # modified 10 s ago
    fp = Fingerprints(tmp_path / "index.json")
    first = fp.file(f)
    fp.save()
    again = Fingerprints(tmp_path / "index.json")  # a new process reads the saved index
    assert again.file(f) == first and again.hashed == []  # one stat, no read
    f.write_text("two")  # same size, new content
    assert again.file(f) != first and again.hashed == [str(f.resolve())]


def test_racy_files_are_hashed_again(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    fp = Fingerprints(racy_s=1.0)
    fp.file(f)
    fp.file(f)  # written less than a second before it was hashed: not trusted from the index
    assert len(fp.hashed) == 2
    lax = Fingerprints(racy_s=0.0)
    lax.file(f)
    lax.file(f)
    assert len(lax.hashed) == 1


def test_missing_source_names_the_source(keys_of, tmp_path):
    src = f"domain.sources=[{{name: gone, path: {tmp_path}/nope.jsonl, prompt: p, response: r}}]"
    with pytest.raises(FileNotFoundError, match="data source 'gone'.*nope.jsonl"):
        keys_of(src, "domain.generator=null")


# --------------------------------------------------------------------------------------------------
# Task files and the base-model evaluation
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def my_task(tmp_path):
    """A copy of the synthetic domain's eval task under a new name, in an eval include path."""
    from grads.evaluation.tasks import TASKS_DIR

    folder = tmp_path / "tasks"
    folder.mkdir()
    text = (TASKS_DIR / "synthetic" / "grads_synthetic.yaml").read_text()
    path = folder / "my_task.yaml"
    path.write_text(text.replace("task: grads_synthetic", "task: my_task"))
    return path, [f"eval.include_paths=[{folder}]", "domain.eval_tasks=[my_task]"]


def test_editing_a_task_file_invalidates_only_evaluate(keys_of, my_task):
    path, ov = my_task
    before = keys_of(*ov)
    path.write_text(path.read_text().replace("Answer:", "A:"))
    assert _changed(before, keys_of(*ov)) == ["evaluate"]


def test_moving_a_task_folder_keeps_the_keys(keys_of, my_task, tmp_path):
    path, ov = my_task
    moved = tmp_path / "elsewhere" / "tasks"
    shutil.copytree(path.parent, moved)
    assert keys_of(*ov) == keys_of(f"eval.include_paths=[{moved}]", ov[1])


def test_editing_the_generated_eval_data_invalidates_evaluate(keys_of, tmp_path):
    before = keys_of(cache=tmp_path)
    eval_file = next((tmp_path / "synthetic").rglob("eval_mc.jsonl"))
    lines = eval_file.read_text().splitlines()
    eval_file.write_text("\n".join(lines[:-1]) + "\n")
    # train.jsonl is untouched, so only the evaluation changes.
    assert _changed(before, keys_of(cache=tmp_path)) == ["evaluate"]


def _plan(names: list[str], metadata: dict) -> SimpleNamespace:
    return SimpleNamespace(
        limits={n: 8 for n in names}, leaves={n: [n] for n in names}, metadata=metadata
    )


def test_base_eval_key_has_no_path_and_sees_task_edits(tmp_path, my_task):
    from grads.evaluation.settings import synthetic_metadata

    path, ov = my_task

    def key(cache: Path) -> str:
        cfg = OmegaConf.to_container(
            compose([*BASE, *ov, f"paths.cache_dir={cache}"]), resolve=True
        )
        ident = base_eval_identity(cfg, _plan(["my_task"], synthetic_metadata(cfg)), ["my_task"], 2)
        assert str(cache) not in json.dumps(ident)
        return digest(ident)

    first = key(tmp_path / "c1")
    assert key(tmp_path / "moved" / "c2") == first
    path.write_text(path.read_text() + "\n# edited\n")
    assert key(tmp_path / "c1") != first


def test_eval_data_files_of_real_tasks_are_found(tmp_path):
    """Declarative discovery: YAML paths, loader default folders, every MMLU subject's files."""
    cfg = compose(["domain=legal", f"paths.cache_dir={tmp_path}"])
    ident = job_identities(OmegaConf.to_container(cfg, resolve=True), ["evaluate"])
    data = ident["evaluate"].identity["evaluate"]["eval_data"]
    assert set(data["grads_cuad_heldout"]) == {"legal/legalbench_2023/cuad_clauses_all.jsonl"}
    assert "legal/legalbench_2023/tasks" in data["grads_legalbench_hearsay"]
    assert set(data["grads_mmlu_jurisprudence"]) == {"general/mmlu/test", "general/mmlu/dev"}
    assert all(v for v in data.values()), [k for k, v in data.items() if not v]


# --------------------------------------------------------------------------------------------------
# One trainer identity
# --------------------------------------------------------------------------------------------------
def _settings(**knobs):
    from grads.training import TrainerSettings

    trainer = OmegaConf.to_container(compose(["experiment=smoke"]).trainer, resolve=True)
    cfg = {"trainer": {**trainer, **knobs}, "model": {"lora_target_modules": ["q_proj"]}, "seed": 0}
    return TrainerSettings.from_cfg(cfg, "finetune")


@pytest.mark.parametrize(
    "knobs",
    [
        {"micro_batch_size": 4},
        {"micro_batch_size": 4, "grad_accum": 2},
        {"micro_batch_size": 4, "grad_accum": 2, "lora": {"dropout": 0.0}},
        {"save_every": 3, "log_every": 9},
        {"lr": 1e-4},
        {"save_merged": True},
    ],
)
def test_stage_key_and_resume_fingerprint_agree(knobs):
    """micro_batch_size & co. change the stage key iff they change the resume fingerprint."""
    ref, other = _settings(), _settings(**knobs)
    model, ids = {"name": "tiny"}, ["a", "b"]
    key_changed = trainer_identity(ref, 1) != trainer_identity(other, 1)
    fp_changed = resume_fingerprint(ref, "finetune", model, ids, 1) != resume_fingerprint(
        other, "finetune", model, ids, 1
    )
    assert key_changed == fp_changed


def test_training_fingerprint_is_the_identity_one():
    from grads.training.recipe import run_fingerprint

    s = _settings(micro_batch_size=2)
    world = 2
    assert run_fingerprint(s, "finetune", {"name": "t"}, ["a"], 2 * s.grad_accum * world) == (
        resume_fingerprint(s, "finetune", {"name": "t"}, ["a"], world)
    )


# --------------------------------------------------------------------------------------------------
# Every knob is classified
# --------------------------------------------------------------------------------------------------
def test_every_top_level_knob_is_keyed_or_declared_non_semantic():
    cfg = compose([])
    assert set(cfg) <= KEYED_SECTIONS | NON_SEMANTIC[""], set(cfg) - KEYED_SECTIONS


@pytest.mark.parametrize("domain", sorted(f.stem for f in (CONF_DIR / "domain").glob("*.yaml")))
def test_no_absolute_path_enters_a_key(tmp_path, domain, data_dir):
    """Paths are replaced by content: keys survive moving the data, the cache or the pool."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"instruction": "q?", "output": "a"}) + "\n")
    ov = [f"domain={domain}", f"paths.cache_dir={tmp_path / 'cache'}", "domain.pool_limit=10"]
    ov += [f"domain.path={pool}"] if domain == "custom" else []
    ids = job_identities(OmegaConf.to_container(compose(ov), resolve=True), STAGES)
    blob = json.dumps({s: i.identity for s, i in ids.items()})
    for path in (tmp_path, data_dir, data_dir.resolve(), Path.cwd()):
        assert str(path) not in blob, (domain, path)
    assert set(DOMAIN_EVAL_FIELDS).isdisjoint(ids["warmup"].identity["pool"])


@pytest.mark.slow
def test_measure_lora_difference_two_processes_vs_one(tmp_path):
    """Why the layout is keyed with LoRA dropout: 2 x 2 vs 1 x 4 differ with dropout, not without."""
    import torch
    from safetensors.torch import load_file

    from grads.training import train
    from tests.test_training import make_cfg, make_pool

    pool = make_pool(16)

    def run(name: str, **kw) -> dict:
        out = tmp_path / name
        cfg = make_cfg(lr=3e-3, **kw)
        cfg["finetune"] = {"epochs": 2}
        train(cfg, "finetune", str(out), pool=pool)
        return load_file(out / "adapter" / "adapter_model.safetensors")

    diffs = {}
    for dropout in (0.05, 0.0):
        lora = {"r": 4, "alpha": 8, "dropout": dropout}
        a = run(f"p1_{dropout}", micro_batch_size=4, procs=1, lora=lora)
        b = run(f"p2_{dropout}", micro_batch_size=2, procs=2, lora=lora)
        diffs[dropout] = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |LoRA weight difference| 2 procs x 2 vs 1 proc x 4: {diffs}")
    assert diffs[0.0] < 1e-5 < diffs[0.05]
    assert torch.isfinite(torch.tensor(list(diffs.values()))).all()
