"""Data pipeline: formatting and masking, truncation, ids, dedup, bad rows, shared domains."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from grads.data import (
    IGNORE_INDEX,
    BadRecordError,
    Record,
    collate,
    is_heldout,
    load_records,
    normalise_text,
    records_from_source,
    sample_id,
    tokenize_record,
    tokenize_records,
)
from tests.conftest import CONF_DIR


def _rec(prompt="What is the capital of Zorbia?", response="Quelm is the capital."):
    return Record(id=sample_id(prompt, response), source="t", prompt=prompt, response=response)


# --------------------------------------------------------------------------------------------------
# Formatting and masking
# --------------------------------------------------------------------------------------------------
def test_prompt_masked_response_kept(tiny_tokenizer):
    rec = _rec()
    s = tokenize_record(rec, tiny_tokenizer, max_seq_len=512)
    ids, labels = s["input_ids"], s["labels"]
    assert len(ids) == len(labels) == s["n_prompt"] + s["n_response"]
    assert all(x == IGNORE_INDEX for x in labels[: s["n_prompt"]])
    assert labels[s["n_prompt"] :] == ids[s["n_prompt"] :]
    prompt_text = tiny_tokenizer.decode(ids[: s["n_prompt"]])
    resp_text = tiny_tokenizer.decode(ids[s["n_prompt"] :])
    assert prompt_text.endswith("<|im_start|>assistant\n") and rec.prompt in prompt_text
    assert resp_text.startswith(rec.response) and "<|im_end|>" in resp_text
    # The concatenation is exactly the chat-templated conversation.
    full = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": rec.prompt}, {"role": "assistant", "content": rec.response}],
        tokenize=False,
    )
    assert tiny_tokenizer.decode(ids) == full


def test_truncation_cuts_prompt_before_response(tiny_tokenizer):
    rec = _rec(prompt="context " * 100 + "QUESTION?", response="short answer")
    s = tokenize_record(rec, tiny_tokenizer, max_seq_len=96)
    assert len(s["input_ids"]) == 96 and s["prompt_truncated"]
    assert tiny_tokenizer.decode(s["input_ids"][s["n_prompt"] :]).startswith("short answer")
    prompt_text = tiny_tokenizer.decode(s["input_ids"][: s["n_prompt"]])
    # The start of the prompt and the assistant header (and the question at its end) survive.
    assert prompt_text.startswith("<|im_start|>user") and prompt_text.endswith("assistant\n")
    assert "QUESTION?" in prompt_text


def test_long_response_is_cut_and_empty_response_reported(tiny_tokenizer, caplog):
    long = _rec(response="x" * 300)
    s = tokenize_record(long, tiny_tokenizer, max_seq_len=64)
    assert len(s["input_ids"]) <= 64 and s["n_response"] > 0
    samples, stats = tokenize_records(
        [long], tiny_tokenizer, {"max_seq_len": 64, "min_response_tokens": 100}
    )
    assert samples == [] and stats["dropped_no_response"] == 1
    assert "no response token left" in caplog.text


def test_collate_left_and_right(tiny_tokenizer):
    a = tokenize_record(_rec(), tiny_tokenizer, 512)
    b = tokenize_record(_rec("Hi?", "Yo."), tiny_tokenizer, 512)
    for side in ("left", "right"):
        batch = collate([a, b], tiny_tokenizer.pad_token_id, side)
        T = batch["input_ids"].shape[1]
        assert max(len(a["input_ids"]), len(b["input_ids"])) == T
        n = len(b["input_ids"])
        row = batch["attention_mask"][1]
        assert int(row.sum()) == n
        assert (row[-n:] if side == "left" else row[:n]).all()
        assert (batch["labels"][1][row == 0] == IGNORE_INDEX).all()


def test_ids_are_stable_content_hashes():
    assert sample_id("a", "b") == sample_id("a", "b")
    assert sample_id("a", "b") != sample_id("a", "c") != sample_id("ab", "")
    assert sample_id("a", "b", "sys") != sample_id("a", "b")


def test_heldout_split_is_deterministic_and_sized():
    texts = [f"clause number {i}" for i in range(5000)]
    held = [t for t in texts if is_heldout(t, 0.1)]
    assert 400 < len(held) < 600
    assert held == [t for t in texts if is_heldout(t.upper(), 0.1)]  # normalised


# --------------------------------------------------------------------------------------------------
# Bad input: file, row and field named
# --------------------------------------------------------------------------------------------------
def _src(path, **kw):
    return {"name": "t", "path": str(path), "prompt": "{q}", "response": "{a}", **kw}


def test_malformed_jsonl_row_names_file_row(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_text('{"q": "x", "a": "y"}\n{"q": "x", "a": \n')
    with pytest.raises(BadRecordError, match=r"pool\.jsonl, row 2: invalid JSON"):
        records_from_source(_src(p))


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"q": "x"}, "a", "missing field"),
        ({"q": "x", "a": ""}, "a", "empty string"),
        ({"q": "x", "a": "  "}, "a", "empty string"),
        ({"q": None, "a": "y"}, "q", "expected a string"),
        ({"q": ["x"], "a": "y"}, "q", "expected a string"),
        ({"q": {"k": 1}, "a": "y"}, "q", "expected a string"),
    ],
)
def test_bad_field_names_file_row_field(tmp_path, row, field, problem):
    p = tmp_path / "pool.jsonl"
    p.write_text(json.dumps({"q": "ok", "a": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(BadRecordError) as exc:
        records_from_source(_src(p))
    msg = str(exc.value)
    assert str(p) in msg and "row 2" in msg and f"field '{field}'" in msg and problem in msg


def test_wrong_csv_columns_and_skip_mode(tmp_path, caplog):
    p = tmp_path / "pool.csv"
    p.write_text("question,answer\nwhat?,that\n")
    with pytest.raises(
        BadRecordError,
        match=r"row 1, field 'q': missing field \(row has \['answer', 'question'\]\)",
    ):
        records_from_source(_src(p))
    good = tmp_path / "mixed.jsonl"
    good.write_text('{"q": "a", "a": "b"}\n{"q": "", "a": "b"}\n{"q": "c", "a": 3}\n')
    counts = Counter()
    recs = records_from_source(_src(good), on_bad_row="skip", counts=counts)
    assert [r.prompt for r in recs] == ["a", "c"] and recs[1].response == "3"
    assert counts["t:bad_row"] == 1


def test_unreadable_file_and_bad_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        records_from_source(_src(tmp_path / "missing.jsonl"))
    p = tmp_path / "ok.jsonl"
    p.write_text('{"q": "a", "a": "b"}\n')
    with pytest.raises(ValueError, match="on_bad_row"):
        records_from_source(_src(p), on_bad_row="ignore")


def test_dedup_and_pool_limit(tmp_path):
    p = tmp_path / "pool.jsonl"
    rows = [{"q": f"q{i % 50}", "a": f"a{i % 50}"} for i in range(60)]  # 10 exact duplicates
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    domain = {"name": "t", "sources": [_src(p)]}
    recs, stats = load_records(domain, {"dedup": True})
    assert len(recs) == 50 and stats["duplicates_removed"] == 10
    lim1, _ = load_records({**domain, "pool_limit": 20}, {})
    lim2, _ = load_records({**domain, "pool_limit": 20}, {})
    assert [r.id for r in lim1] == [r.id for r in lim2] and len(lim1) == 20
    assert {r.id for r in lim1} <= {r.id for r in recs}
    other, _ = load_records({**domain, "pool_limit": 20, "pool_seed": 1}, {})
    assert {r.id for r in other} != {r.id for r in lim1}


# --------------------------------------------------------------------------------------------------
# The shared domains: expected sizes and no train/eval overlap
# --------------------------------------------------------------------------------------------------
# after the held-out split of grads.heldout (300, 301 and 300 samples) is removed
EXPECTED = {"medical": 18251, "legal": 10081, "financial": 10617}


def _domain(name, data_dir, tmp_path=None):
    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(data_dir), "cache_dir": str(tmp_path or "/tmp")},
            "domain": OmegaConf.load(CONF_DIR / "domain" / f"{name}.yaml"),
        }
    )
    return OmegaConf.to_container(cfg, resolve=True)["domain"]


def _eval_texts(name, data_dir):
    """Evaluation items of a domain, read independently of the domain config."""
    import csv

    texts = set()

    def jsonl(path, field, extract=False):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            text = row[field]
            if extract:
                text = text.split("Input: ", 1)[1].rsplit("\nAnswer", 1)[0]
            texts.add(normalise_text(text))

    def mmlu(*subjects):
        for s in subjects:
            with open(
                data_dir / "general" / "mmlu" / "test" / f"{s}_test.csv", encoding="utf-8"
            ) as fh:
                texts.update(normalise_text(r["question"]) for r in csv.DictReader(fh))

    if name == "medical":
        test_ids = json.load(open(data_dir / "medical/pubmedqa/test_ground_truth.json"))
        pq = json.load(open(data_dir / "medical/pubmedqa/ori_pqal.json"))
        texts.update(normalise_text(pq[k]["QUESTION"]) for k in test_ids)
        for line in open(data_dir / "medical/bioasq/bioasq_7b_11b_golden.jsonl"):
            row = json.loads(line)
            if row["type"] == "yesno":
                texts.add(normalise_text(row["question"]))
        jsonl(data_dir / "medical/medmcqa/dev.json", "question")
        mmlu(
            "anatomy",
            "clinical_knowledge",
            "college_biology",
            "college_medicine",
            "medical_genetics",
            "professional_medicine",
        )
    elif name == "legal":
        for line in open(data_dir / "legal/legalbench_2023/cuad_clauses_all.jsonl"):
            clause = json.loads(line)["clause"]
            if is_heldout(clause, 0.1):
                texts.add(normalise_text(clause))
        mmlu("professional_law", "jurisprudence", "international_law")
    else:
        for f in ("fpb_test", "fiqa_test", "nwgi_test"):
            jsonl(data_dir / "financial/finlora_eval" / f"{f}.jsonl", "context", extract=True)
        mmlu(
            "professional_accounting",
            "econometrics",
            "high_school_macroeconomics",
            "high_school_microeconomics",
        )
    return texts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_domain_sizes_and_no_eval_overlap(name, data_dir):
    domain = _domain(name, data_dir)
    recs, stats = load_records(domain, {"on_bad_row": "error", "dedup": True})
    assert len(recs) == EXPECTED[name], stats
    evals = _eval_texts(name, data_dir)
    assert len(evals) > 100
    leaked = [
        r
        for r in recs
        if normalise_text(r.meta.get("key_text") or r.prompt) in evals
        or normalise_text(r.prompt) in evals
    ]
    assert leaked == [], f"{len(leaked)} evaluation items in the {name} train pool"
    if name == "financial":  # the overlaps the READMEs list are found and removed
        assert (
            stats["fiqa_sa:eval_overlap"] == 128 and stats["semeval_headlines:eval_overlap"] == 131
        )
        assert stats["fpb:filtered"] == 1217


def test_synthetic_domain_learnable_and_heldout(tmp_path):
    from grads import synthetic

    paths = synthetic.materialise(tmp_path, seed=0)
    data = {k: [json.loads(x) for x in open(p)] for k, p in paths.items()}
    assert len(data["eval_mc"]) == 200 and len(data["probe"]) >= 40
    train_prompts = {r["prompt"] for r in data["train"]}
    for q in data["eval_mc"]:
        assert q["question"] not in train_prompts and 0 <= q["answer"] < 4
        assert len(set(q["choices"])) == 4
        # The fact is taught: the right answer appears in some training response for that entity.
        entity = q["id"].rsplit("-", 1)[0]
        assert any(
            q["choices"][q["answer"]] in r["response"]
            for r in data["train"]
            if r["entity"] == entity
        )
    assert synthetic.generate(0) == synthetic.generate(0) and synthetic.generate(
        1
    ) != synthetic.generate(0)
