"""Evaluation with lm-eval: exact tiny-model scores, metric arithmetic, base cache, validation, tasks.

The tiny-model tests use small task YAMLs written to ``tmp_path`` (passed with ``eval.include_paths``)
so that they run in seconds; the shipped ``grads_*`` tasks are checked for loading and documents only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from grads.evaluation import (
    TASKS_DIR,
    TaskConfigError,
    compare,
    evaluate,
    mean_score,
    prepare,
    run_evaluate,
    scan_task_files,
    summarise,
    task_lists,
    task_scores,
    validate_tasks,
)

# ---------------------------------------------------------------------------------------------------
# Tiny local tasks
# ---------------------------------------------------------------------------------------------------
TINY_ROWS = {
    "alpha": [
        {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "label": 0},
        {"question": "How many legs has a cat?", "choices": ["two", "four", "six"], "label": 1},
        {"question": "What is 2 + 2?", "choices": ["3", "4", "22"], "label": 1},
        {"question": "Which is a fruit?", "choices": ["apple", "chair", "stone"], "label": 0},
        {"question": "Opposite of hot?", "choices": ["warm", "cold", "loud"], "label": 1},
        {"question": "Where do fish live?", "choices": ["trees", "sand", "water"], "label": 2},
    ],
    "beta": [
        {"question": "Is ice cold?", "choices": ["no", "yes"], "label": 1},
        {"question": "Can pigs fly?", "choices": ["no", "yes"], "label": 0},
        {"question": "Is the sun a star?", "choices": ["no", "yes"], "label": 1},
        {"question": "Is water dry?", "choices": ["no", "yes"], "label": 0},
    ],
}

TINY_YAML = """# Tiny test task {name}.
task: {name}
custom_dataset: !function grads.evaluation.tasks.utils.load_choices_jsonl
dataset_kwargs:
  path: {rel}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture()
def tiny_tasks(tmp_path: Path) -> dict:
    """Two tiny MC tasks (``tiny_alpha``, ``tiny_beta``) with their data under ``tmp_path/data``."""
    data, tasks = tmp_path / "data", tmp_path / "tasks"
    (data / "tiny").mkdir(parents=True)
    tasks.mkdir()
    for key, rows in TINY_ROWS.items():
        (data / "tiny" / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"tiny_{key}.yaml").write_text(
            TINY_YAML.format(name=f"tiny_{key}", rel=f"tiny/{key}.jsonl")
        )
    return {"data": data, "tasks": tasks, "root": tmp_path}


def tiny_cfg(t: dict, **eval_overrides) -> dict:
    ev = {
        "name": "test",
        "include_paths": [str(t["tasks"])],
        "batch_size": 4,
        "limit": None,
        "general_tasks": ["tiny_beta"],
        **eval_overrides,
    }
    return {
        "paths": {"data_dir": str(t["data"]), "cache_dir": str(t["root"] / "cache")},
        "model": {"name": "tiny", "source": "tiny"},
        "domain": {"name": "toy", "eval_tasks": ["tiny_alpha"]},
        "eval": ev,
    }


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of ``continuation`` after ``context``, tokenised as lm-eval's HFLM."""
    import torch

    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


# ---------------------------------------------------------------------------------------------------
# Tiny-model evaluation
# ---------------------------------------------------------------------------------------------------
def test_tiny_evaluation_is_exact_and_reproducible(tiny, tiny_tasks):
    model, tok = tiny
    cfg = tiny_cfg(tiny_tasks)
    first = evaluate(model, tok, cfg, ["tiny_alpha"], ["tiny_beta"])
    second = evaluate(model, tok, cfg, ["tiny_alpha"], ["tiny_beta"])
    assert first["tasks"] == second["tasks"]
    assert first["domain_acc"] == second["domain_acc"]

    # Hand-computed accuracy: argmax of the summed log-likelihood of " <choice>" after the prompt.
    for key in ("alpha", "beta"):
        hits, hits_norm = [], []
        for row in TINY_ROWS[key]:
            ctx = f"Question: {row['question']}\nAnswer:"
            lls = [loglikelihood(model, tok, ctx, " " + c) for c in row["choices"]]
            hits.append(max(range(len(lls)), key=lls.__getitem__) == row["label"])
            norm = [ll / len(c) for ll, c in zip(lls, row["choices"])]
            hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == row["label"])
        scores = first["tasks"][f"tiny_{key}"]
        assert scores["n"] == len(TINY_ROWS[key])
        assert scores["acc"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
        assert scores["acc_norm"] == pytest.approx(sum(hits_norm) / len(hits_norm), abs=1e-12)
        p, n = scores["acc"], scores["n"]
        assert scores["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert first["domain_acc"] == first["tasks"]["tiny_alpha"]["acc"]
    assert first["general_acc"] == first["tasks"]["tiny_beta"]["acc"]


def test_limit_evaluates_the_first_n_shuffled_docs(tiny, tiny_tasks):
    model, tok = tiny
    cfg = tiny_cfg(tiny_tasks, limit=2, task_limits={"tiny_beta": 3})
    out = evaluate(model, tok, cfg, ["tiny_alpha"], ["tiny_beta"])
    assert out["tasks"]["tiny_alpha"]["n"] == 2
    assert out["tasks"]["tiny_beta"]["n"] == 3
    assert out["n_items"] == 5


# ---------------------------------------------------------------------------------------------------
# Metric arithmetic
# ---------------------------------------------------------------------------------------------------
def test_metric_arithmetic():
    scores = {
        "d1": {"acc": 0.5, "acc_stderr": 0.1},
        "d2": {"acc": 0.7, "acc_stderr": 0.2},
        "g1": {"acc": 0.4, "acc_stderr": 0.1, "acc_norm": 0.6, "acc_norm_stderr": 0.1},
    }
    mean, se = mean_score(scores, ["d1", "d2"])
    assert mean == pytest.approx(0.6)
    assert se == pytest.approx(math.sqrt(0.1**2 + 0.2**2) / 2)
    assert mean_score(scores, ["g1"], metric="acc_norm")[0] == pytest.approx(0.6)
    assert mean_score(scores, ["d1"], metric="acc_norm")[0] == pytest.approx(0.5)  # falls back
    assert mean_score(scores, []) == (None, None)

    tuned = summarise(scores, ["d1", "d2"], ["g1"])
    base = {"domain_acc": 0.45, "general_acc": 0.5}
    deltas = compare(tuned, base)
    assert deltas["domain_gain"] == pytest.approx(0.6 - 0.45)
    assert deltas["forgetting"] == pytest.approx(0.5 - 0.4)
    assert compare({"domain_acc": None, "general_acc": 0.3}, base)["domain_gain"] is None


def test_task_scores_parses_lm_eval_results():
    results = {
        "results": {
            "t": {"acc,none": 0.25, "acc_stderr,none": 0.1, "alias": "t"},
            "grp": {"acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 8},
        },
        "n-samples": {"t": {"original": 100, "effective": 4}},
    }
    out = task_scores(results, ["t", "grp"])
    assert out["t"] == {"acc": 0.25, "acc_stderr": 0.1, "n": 4}
    # a group with an N/A stderr gets the stderr of the pooled proportion
    assert out["grp"]["n"] == 8
    assert out["grp"]["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 7))
    with pytest.raises(KeyError, match="missing"):
        task_scores(results, ["missing"])


# ---------------------------------------------------------------------------------------------------
# Stage: metrics.json and the base-model cache
# ---------------------------------------------------------------------------------------------------
def test_run_evaluate_caches_the_base_model(tiny, tiny_tasks, tmp_path):
    from grads.models import build_tiny

    model, tok = tiny
    cfg = tiny_cfg(tiny_tasks)
    calls = []

    def load_base():
        calls.append(1)
        return build_tiny(tied=True, seed=1)

    m1 = run_evaluate(cfg, model, tok, tmp_path / "run1", load_base)
    m2 = run_evaluate(cfg, model, tok, tmp_path / "run2", load_base)
    assert len(calls) == 1
    assert m1["base_cache"]["domain"]["cache"] == "miss"
    assert m2["base_cache"]["domain"]["cache"] == "hit" == m2["base_cache"]["general"]["cache"]
    written = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    for key in (
        "domain_acc",
        "general_acc",
        "base_domain_acc",
        "base_general_acc",
        "domain_gain",
        "forgetting",
        "tasks",
        "base_tasks",
    ):
        assert key in written
    assert written["base_tasks"] == m1["base_tasks"]
    assert written["domain_gain"] == pytest.approx(
        written["domain_acc"] - written["base_domain_acc"]
    )
    assert written["forgetting"] == pytest.approx(
        written["base_general_acc"] - written["general_acc"]
    )
    assert written["tasks"]["tiny_alpha"]["acc"] == m1["tasks"]["tiny_alpha"]["acc"]
    cached = list((tiny_tasks["root"] / "cache" / "eval_base").glob("*.json"))
    assert len(cached) == 2  # domain and general parts

    # a different suite setting is a different cache entry
    run_evaluate(tiny_cfg(tiny_tasks, limit=3), model, tok, tmp_path / "run3", load_base)
    assert len(calls) == 2


def test_run_evaluate_skips_when_disabled(tmp_path):
    out = run_evaluate({"eval": {"enabled": False}}, None, None, tmp_path, lambda: 1 / 0)
    assert out["skipped"] is True
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped"] is True


# ---------------------------------------------------------------------------------------------------
# Validation: fails before any model is used, naming task and file
# ---------------------------------------------------------------------------------------------------
def _boom():
    raise AssertionError("load_base must not be called")


def test_unknown_task_name_fails_before_the_model(tiny_tasks, tmp_path):
    cfg = tiny_cfg(tiny_tasks)
    cfg["domain"]["eval_tasks"] = ["grads_no_such_task"]
    with pytest.raises(TaskConfigError, match="grads_no_such_task"):
        validate_tasks(cfg)
    with pytest.raises(TaskConfigError, match="grads_no_such_task"):
        run_evaluate(cfg, object(), object(), tmp_path, _boom)  # the model is never touched


def test_malformed_task_file_is_named(tiny_tasks):
    bad = tiny_tasks["tasks"] / "tiny_gamma.yaml"
    bad.write_text('task: tiny_gamma\ndoc_to_text: "unclosed\n  - [\n')
    cfg = tiny_cfg(tiny_tasks)
    cfg["domain"]["eval_tasks"] = ["tiny_gamma"]
    with pytest.raises(TaskConfigError, match=r"tiny_gamma.*tiny_gamma\.yaml.*malformed"):
        validate_tasks(cfg)


def test_missing_data_file_is_named(tiny_tasks):
    (tiny_tasks["data"] / "tiny" / "alpha.jsonl").unlink()
    with pytest.raises(TaskConfigError, match=r"tiny_alpha.*tiny_alpha\.yaml.*alpha\.jsonl"):
        validate_tasks(tiny_cfg(tiny_tasks))


def test_bad_label_in_data_is_named(tiny_tasks):
    path = tiny_tasks["data"] / "tiny" / "beta.jsonl"
    path.write_text(
        path.read_text() + json.dumps({"question": "?", "choices": ["a"], "label": 3}) + "\n"
    )
    with pytest.raises(TaskConfigError, match=r"tiny_beta.*beta\.jsonl, row 5"):
        validate_tasks(tiny_cfg(tiny_tasks))


def test_group_member_without_a_file_and_duplicates(tiny_tasks):
    (tiny_tasks["tasks"] / "_tiny_group.yaml").write_text(
        "group: tiny_group\ntask: [tiny_alpha, grads_missing_member]\n"
    )
    cfg = tiny_cfg(tiny_tasks)
    cfg["domain"]["eval_tasks"] = ["tiny_group"]
    with pytest.raises(TaskConfigError, match=r"grads_missing_member.*tiny_group"):
        validate_tasks(cfg)
    (tiny_tasks["tasks"] / "_tiny_group.yaml").write_text("group: tiny_group\ntask: [tiny_alpha]\n")
    cfg["domain"]["eval_tasks"] = ["tiny_group", "tiny_alpha"]
    with pytest.raises(TaskConfigError, match="requested twice"):
        validate_tasks(cfg)


def test_bad_eval_knobs_fail():
    with pytest.raises(TaskConfigError, match="tasks_from"):
        validate_tasks({"eval": {"tasks_from": "web"}})
    with pytest.raises(TaskConfigError, match="limit"):
        validate_tasks({"eval": {"limit": -1}})


# ---------------------------------------------------------------------------------------------------
# Shipped tasks: every YAML parses; every task loads its documents from the shared data
# ---------------------------------------------------------------------------------------------------
EXPECTED_SIZES = {
    "grads_pubmedqa": 500,
    "grads_bioasq_yn": 618,
    "grads_medmcqa": 4183,
    "grads_legalbench_overruling": 2394,
    "grads_legalbench_hearsay": 95,
    "grads_legalbench_abercrombie": 95,
    "grads_legalbench_proa": 95,
    "grads_legalbench_personal_jurisdiction": 50,
    "grads_legalbench_unfair_tos": 3850,
    **{f"grads_legalbench_diversity_{i}": 300 for i in range(1, 7)},
    "grads_fpb": 1212,
    "grads_fiqa_sa": 235,
    "grads_nwgi": 4047,
    "grads_hellaswag": 10042,
    "grads_arc_easy": 2376,
    "grads_arc_challenge": 1172,
    "grads_boolq_cb": 3270,
    "grads_siqa": 1954,
    "grads_synthetic": 200,
    "grads_probe": 48,
}
MMLU_SIZES = {
    "grads_mmlu_medical": 1089,
    "grads_mmlu_legal": 1763,
    "grads_mmlu_finance": 1024,
    "grads_mmlu_general": 10166,
}
DOMAIN_GROUPS = ["grads_medical", "grads_legal", "grads_financial", "grads_general"]


def test_every_shipped_task_file_parses_and_has_a_header():
    index, broken = scan_task_files([TASKS_DIR])
    assert not broken, broken
    yamls = sorted(TASKS_DIR.rglob("*.yaml"))
    assert len(yamls) > 80
    for path in yamls:
        assert path.read_text().startswith("#"), f"{path} has no header comment"
    for name in [*EXPECTED_SIZES, *MMLU_SIZES, *DOMAIN_GROUPS, "grads_legalbench"]:
        assert name in index, name


def test_every_shipped_task_loads_its_docs(data_dir, tmp_path):
    cfg = {
        "paths": {"data_dir": str(data_dir), "cache_dir": str(tmp_path)},
        "domain": {"generator": {"out_dir": str(tmp_path / "syn"), "seed": 0}},
        "eval": {"limit": 3},
    }
    plan = prepare(cfg, [*DOMAIN_GROUPS, "grads_synthetic", "grads_probe"])
    for name, size in EXPECTED_SIZES.items():
        assert plan.sizes[name] == size, name
    for group, size in MMLU_SIZES.items():
        assert sum(plan.sizes[s] for s in _members(group)) == size, group
    assert 1000 < plan.sizes["grads_cuad_heldout"] < 1400  # ~10% of 11,561 rows
    assert sum(1 for leaf in plan.sizes if leaf.startswith("grads_mmlu_")) == 57
    # group limits are split over members: 3 docs for grads_legal's 3 members -> 1 per member, ...
    assert all(1 <= n <= 3 for n in plan.limits.values())
    assert plan.limits["grads_pubmedqa"] == 1 and plan.limits["grads_synthetic"] == 3
    for obj in plan.fresh_objects(["grads_medical"]).values():
        for task in obj.get_all_tasks():
            doc = task.eval_docs[0]
            assert task.doc_to_text(doc).strip(), task.task_name
            gold = task.doc_to_target(doc)
            assert 0 <= gold < len(task.doc_to_choice(doc)), task.task_name


def _members(group: str) -> list[str]:
    index, _ = scan_task_files([TASKS_DIR])
    return index[group].members


def test_few_shot_uses_the_dev_split_and_pinned_tasks_stay_zero_shot(data_dir, tmp_path):
    cfg = {"paths": {"data_dir": str(data_dir), "cache_dir": str(tmp_path)}, "eval": {"limit": 1}}
    names = ["grads_pubmedqa", "grads_mmlu_anatomy", "grads_legalbench_hearsay", "grads_bioasq_yn"]
    objects = prepare(cfg, names).fresh_objects(names)
    for name in names[:3]:
        task = objects[name]
        task.set_fewshot_seed(seed=0)
        doc = task.eval_docs[0]
        prompt = task.fewshot_context(doc, 2)
        assert prompt.endswith(task.doc_to_text(doc)), name
        cue = "A:" if "legalbench" in name else "Answer:"
        assert prompt.count(cue) == 3, name  # two solved examples + the question
        assert task.fewshot_docs() is not None
    mmlu = objects["grads_mmlu_anatomy"]
    first_dev = mmlu.fewshot_docs()[0]["question"].strip()
    assert first_dev in mmlu.fewshot_context(mmlu.eval_docs[0], 1)  # first_n sampler
    assert objects["grads_bioasq_yn"].get_config("num_fewshot") == 0


def test_chat_template_runs(tiny, tiny_tasks):
    model, tok = tiny
    out = evaluate(model, tok, tiny_cfg(tiny_tasks, apply_chat_template=True), ["tiny_alpha"], [])
    assert out["tasks"]["tiny_alpha"]["n"] == len(TINY_ROWS["alpha"])
    assert out["general_acc"] is None


@pytest.mark.parametrize("domain", ["medical", "legal", "financial", "synthetic"])
def test_every_domain_config_validates(domain, tmp_path):
    """The composed pipeline config (conf/domain + conf/eval/quick) names only loadable tasks."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    cfg = OmegaConf.to_container(
        compose([f"domain={domain}", "eval=quick", f"paths.cache_dir={tmp_path}"]), resolve=True
    )
    domain_tasks, general_tasks = task_lists(cfg)
    assert domain_tasks and general_tasks
    validate_tasks(cfg)


def test_task_lists_follow_the_config():
    cfg = {
        "domain": {"eval_tasks": ["a", "b"], "eval_tasks_hub": ["h"], "eval_tasks_general": ["p"]},
        "eval": {"general_tasks": ["g", "a"], "general_tasks_hub": ["gh"]},
    }
    assert task_lists(cfg) == (["a", "b"], ["g", "p"])
    cfg["eval"]["tasks_from"] = "hub"
    assert task_lists(cfg) == (["h"], ["gh", "p"])


def test_hub_task_names_exist_in_lm_eval():
    """Online (hub) task lists name real lm-eval built-ins; unknown names fail with a message."""
    from lm_eval.tasks import TaskManager

    from tests.conftest import compose

    known = set(TaskManager().all_tasks)
    names = set(_members("grads_hub_mmlu_general"))
    for domain in ("medical", "legal", "financial"):
        cfg = compose([f"domain={domain}", "eval=hub"])
        names |= set(cfg.domain.eval_tasks_hub) | set(cfg.eval.general_tasks_hub)
    names.discard("grads_hub_mmlu_general")
    assert names - known == set()
    with pytest.raises(TaskConfigError, match="not_a_real_task"):
        validate_tasks(
            {"paths": {"data_dir": "."}, "domain": {"eval_tasks": ["not_a_real_task"]}, "eval": {}}
        )


# ---------------------------------------------------------------------------------------------------
# Real model (slow)
# ---------------------------------------------------------------------------------------------------
SMOLLM2_FEW_ITEMS = {
    "grads_pubmedqa": (0.5, 2),
    "grads_cuad_heldout": (1.0, 2),
    "grads_fpb": (0.0, 2),
    "grads_mmlu_finance": (0.25, 4),
    "grads_arc_easy": (1.0, 2),
    "grads_boolq_cb": (0.5, 2),
}


@pytest.mark.slow
def test_smollm2_few_items_of_each_domain(data_dir, tmp_path):
    from grads.models import load_model
    from tests.conftest import REPO

    model, tok = load_model(
        {"source": "gguf", "dtype": "float32"}, cache_dir=REPO / "outputs/models"
    )
    cfg = {
        "paths": {"data_dir": str(data_dir), "cache_dir": str(tmp_path)},
        "eval": {"limit": 2, "batch_size": 8},
    }
    tasks = ["grads_pubmedqa", "grads_cuad_heldout", "grads_fpb", "grads_mmlu_finance"]
    out = evaluate(model, tok, cfg, tasks, ["grads_arc_easy", "grads_boolq_cb"])
    again = evaluate(model, tok, cfg, tasks, ["grads_arc_easy", "grads_boolq_cb"])
    assert out["tasks"] == again["tasks"]
    # Pinned (acc, n): `0 <= acc <= 1` could not fail; these change only if scoring, prompts, the
    # seeded document order or the model change.
    assert {name: (s["acc"], s["n"]) for name, s in out["tasks"].items()} == SMOLLM2_FEW_ITEMS


# ---------------------------------------------------------------------------------------------------
# Continuous metrics: held-out domain loss, reference-answer NLL, KL(base || tuned)
# ---------------------------------------------------------------------------------------------------
REF_ROWS = [
    {"id": 0, "instruction": "Name a colour.", "output": "Blue is a colour.", "dataset": "t"},
    {"id": 1, "instruction": "Count to three.", "output": "One, two, three.", "dataset": "t"},
    {"id": 2, "instruction": "Say hi.", "output": "Hi there! How can I help?", "dataset": "t"},
    {"id": 3, "instruction": "What is ice?", "output": "Frozen water.", "dataset": "t"},
]
POOL_ROWS = [{"q": f"What is fact {i}?", "a": f"Fact {i} is {i * 7 % 11}."} for i in range(24)]


@pytest.fixture()
def loss_cfg(tiny_tasks) -> dict:
    """Tiny tasks + the shipped grads_heldout / grads_alpaca_ref on tiny data, KL on the latter."""
    data = tiny_tasks["data"]
    (data / "general" / "alpaca_eval").mkdir(parents=True)
    (data / "general" / "alpaca_eval" / "alpaca_eval.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in REF_ROWS)
    )
    (data / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in POOL_ROWS))
    cfg = tiny_cfg(
        tiny_tasks,
        general_tasks=[],
        domain_loss_tasks=["grads_heldout"],
        ref_tasks=["grads_alpaca_ref"],
        kl_task="grads_alpaca_ref",
    )
    cfg["domain"] |= {
        "sources": [
            {"name": "toy", "path": str(data / "pool.jsonl"), "prompt": "{q}", "response": "{a}"}
        ],
        "heldout": {"n": 5},
    }
    return cfg


def _by_hand(model, tok, prompt: str, response: str):
    """Response NLL, token count and the logits predicting each response token (float64)."""
    import torch

    msgs = [{"role": "user", "content": prompt}]
    ctx = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
    ids = tok(ctx + response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    rows = logits[n_ctx - 1 : len(ids) - 1]
    logp = torch.log_softmax(rows, dim=-1)
    nll = -sum(float(logp[j, ids[n_ctx + j]]) for j in range(len(ids) - n_ctx))
    return nll, len(ids) - n_ctx, rows


def test_heldout_loss_and_kl_match_a_hand_computation(tiny, loss_cfg, tmp_path):
    import torch

    from grads.data.heldout import heldout_records
    from grads.models import build_tiny

    model, tok = tiny
    base_model, _ = build_tiny(tied=True, seed=1)
    m = run_evaluate(loss_cfg, model, tok, tmp_path / "run", lambda: (base_model, tok))

    held = heldout_records(loss_cfg)
    assert len(held) == 5 and m["items"]["tuned"]["domain_loss"]["grads_heldout"]["keys"]
    for mdl, key in ((model, "domain_loss"), (base_model, "base_domain_loss")):
        nll = tokens = nbytes = 0.0
        for r in held:
            a, n, _ = _by_hand(mdl, tok, r.prompt, r.response)
            nll, tokens, nbytes = nll + a, tokens + n, nbytes + len(r.response.encode())
        assert m[key] == pytest.approx(nll / tokens, abs=1e-5)
        assert m[key.replace("loss", "bpb")] == pytest.approx(nll / nbytes / math.log(2), abs=1e-5)
    assert m["domain_loss_gain"] == pytest.approx(m["base_domain_loss"] - m["domain_loss"])

    kl = nll = tokens = 0.0
    for row in REF_ROWS:
        a, n, tuned_rows = _by_hand(model, tok, row["instruction"], row["output"])
        _, _, base_rows = _by_hand(base_model, tok, row["instruction"], row["output"])
        p, q = torch.log_softmax(base_rows, -1), torch.log_softmax(tuned_rows, -1)
        kl += float((p.exp() * (p - q)).sum())
        nll, tokens = nll + a, tokens + n
    assert m["general_kl"] == pytest.approx(kl / tokens, abs=1e-5)
    assert m["ref_nll"] == pytest.approx(nll / tokens, abs=1e-5)
    assert m["kl_nll_gap"] < 1e-3  # the KL pass scored the very tokens lm-eval scored
    # lm-eval's own aggregate agrees with the per-item computation
    assert m["loss_tasks"]["grads_alpaca_ref"]["bits_per_byte"] == pytest.approx(m["ref_bpb"])


def test_item_metrics_reproduce_the_task_scores(tiny, tiny_tasks):
    from grads.evaluation.metrics import ITEM_METRICS

    model, tok = tiny
    out = evaluate(model, tok, tiny_cfg(tiny_tasks), ["tiny_alpha"], ["tiny_beta"])
    assert ITEM_METRICS["domain_acc"].value(out["items"]["domain"]) == out["domain_acc"]
    assert ITEM_METRICS["general_acc"].value(out["items"]["general"]) == out["general_acc"]
    norm = ITEM_METRICS["general_acc_norm"].value(out["items"]["general"])
    assert norm == out["tasks"]["tiny_beta"]["acc_norm"]
    keys = out["items"]["domain"]["tiny_alpha"]["keys"]
    assert len(keys) == len(set(keys)) == len(TINY_ROWS["alpha"])


def test_clipping_is_deterministic_and_keeps_the_question():
    from grads.evaluation.tasks.utils import clip_head, clip_middle, wikitext_detokenize

    text = "word " * 200
    assert clip_head(text, 50) == clip_head(text, 50) and len(clip_head(text, 50)) <= 50
    assert clip_head(text, 50).endswith("word")
    prompt = "Context: " + "x" * 1000 + " Question: is it?"
    cut = clip_middle(prompt, 200)
    assert len(cut) <= 200 and cut.startswith("Context: ") and cut.endswith("is it?")
    assert clip_head("short", 50) == "short" and clip_middle("short", None) == "short"
    assert (
        wikitext_detokenize("1 @,@ 000 people , he said . It 's") == "1,000 people, he said. It's"
    )


def test_loss_task_config_errors_are_named(tiny_tasks):
    cfg = tiny_cfg(tiny_tasks, kl_task="grads_alpaca_ref")
    with pytest.raises(TaskConfigError, match="kl_task.*ref_tasks"):
        validate_tasks(cfg)
    with pytest.raises(TaskConfigError, match="kl_limit"):
        validate_tasks(tiny_cfg(tiny_tasks, kl_limit=0))
    # A domain without a held-out split (e.g. a custom pool) has no held-out loss to measure: the
    # task is dropped from the run's parts instead of failing.
    from grads.evaluation.settings import part_lists

    cfg = tiny_cfg(tiny_tasks, domain_loss_tasks=["grads_heldout"])
    assert part_lists(cfg)["domain_loss"] == []
    validate_tasks(cfg)


def test_part_lists_follow_the_config():
    from grads.evaluation import part_lists

    cfg = {
        "domain": {"eval_tasks": ["a"], "eval_tasks_general": ["p"]},
        "eval": {
            "general_tasks": ["g"],
            "domain_loss_tasks": ["h"],
            "ref_tasks": ["r", "g"],
            "text_tasks": ["w"],
            "kl_task": "r",
        },
    }
    assert part_lists(cfg) == {
        "domain": ["a"],
        "general": ["g", "p"],
        "domain_loss": ["h"],
        "ref": ["r"],  # a task already listed in an accuracy part is not repeated
        "text": ["w"],
    }


@pytest.mark.parametrize("by_size", [True, False])
def test_item_metrics_reproduce_a_group_score(tiny, tiny_tasks, by_size):
    from grads.evaluation.metrics import ITEM_METRICS

    (tiny_tasks["tasks"] / "_tiny_group.yaml").write_text(
        "group: tiny_group\ntask: [tiny_alpha, tiny_beta]\naggregate_metric_list:\n"
        f"  - metric: acc\n    aggregation: mean\n    weight_by_size: {str(by_size).lower()}\n"
    )
    model, tok = tiny
    out = evaluate(model, tok, tiny_cfg(tiny_tasks), ["tiny_group"], [])
    a, b = out["subtasks"]["tiny_alpha"]["acc"], out["subtasks"]["tiny_beta"]["acc"]
    expected = (6 * a + 4 * b) / 10 if by_size else (a + b) / 2
    assert out["domain_acc"] == pytest.approx(expected)
    assert ITEM_METRICS["domain_acc"].value(out["items"]["domain"]) == pytest.approx(expected)
