"""Data pipeline: formatting and masking, truncation, ids, dedup, bad rows, shared domains."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from grads.data.pool import IGNORE_INDEX, collate, load_records, tokenize_record, tokenize_records
from grads.data.readers import BadRecordError
from grads.data.records import Record, is_heldout, normalise_text, records_from_source, sample_id
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
    # Pinned: a change here silently invalidates every cached selection and cross-run comparison.
    assert sample_id("a", "b") == "445ca3636e002aa2"
    assert sample_id("a", "b", "sys") == "5b66c5231d94fe2a"
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


def _bad_rows(counts: Counter) -> dict:
    return {k: v for k, v in counts.items() if ":bad_row" in k}


def test_non_utf8_byte_names_file_row_and_field(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_bytes(b'{"q": "fine", "a": "ok"}\n{"q": "caf\xe9", "a": "ok"}\n')
    with pytest.raises(
        BadRecordError, match=r"pool\.jsonl, row 2, field 'q': not valid UTF-8 \(byte 0xe9"
    ):
        records_from_source(_src(p))
    csv_p = tmp_path / "pool.csv"
    csv_p.write_bytes(b"q,a\nfine,ok\nbad,caf\xff\n")
    with pytest.raises(
        BadRecordError, match=r"pool\.csv, row 2, field 'a': not valid UTF-8 \(byte 0xff"
    ):
        records_from_source(_src(csv_p))
    # A bad byte in a field the source does not use is harmless.
    p.write_bytes(b'{"q": "x", "a": "y", "note": "\xff"}\n')
    assert [r.prompt for r in records_from_source(_src(p))] == ["x"]


def test_skip_mode_skips_and_counts_every_kind_of_bad_row(tmp_path):
    p = tmp_path / "pool.jsonl"
    p.write_bytes(
        b'{"q": "good 1", "a": "y"}\n'
        b'{"q": "broken", "a": \n'  # invalid JSON
        b'{"q": "caf\xe9", "a": "y"}\n'  # not UTF-8 inside a used field
        b'{"q": "x", "a": "y"}\xff\n'  # a stray byte that breaks the JSON
        b'["not", "an", "object"]\n'
        b'{"a": "y"}\n'  # missing field
        b'{"q": "", "a": "y"}\n'  # empty field
        b'{"q": ["x"], "a": "y"}\n'  # wrong type
        b'{"q": "good 2", "a": "y"}\n'
    )
    counts = Counter()
    recs = records_from_source(_src(p), on_bad_row="skip", counts=counts)
    assert [r.prompt for r in recs] == ["good 1", "good 2"]
    assert _bad_rows(counts) == {
        "t:bad_row": 7,
        "t:bad_row:invalid_json": 2,
        "t:bad_row:not_utf8": 1,
        "t:bad_row:not_an_object": 1,
        "t:bad_row:missing_field": 1,
        "t:bad_row:empty_field": 1,
        "t:bad_row:wrong_type": 1,
    }
    with pytest.raises(BadRecordError, match=r"row 2: invalid JSON"):
        records_from_source(_src(p))  # error mode stops at the first one


def test_csv_row_with_an_extra_or_missing_value(tmp_path):
    p = tmp_path / "pool.csv"
    p.write_text("q,a\nwhat?,that\nwhat, really?,that\nonly one\n")
    with pytest.raises(
        BadRecordError,
        match=r"pool\.csv, row 2: 3 values for the 2 columns \['q', 'a'\] \(an unquoted delimiter",
    ):
        records_from_source(_src(p))
    counts = Counter()
    recs = records_from_source(_src(p), on_bad_row="skip", counts=counts)
    assert [(r.prompt, r.response) for r in recs] == [("what?", "that")]
    assert _bad_rows(counts) == {"t:bad_row": 2, "t:bad_row:column_count": 2}
    p.write_text("q,a\nwhat?,that\nonly one\n")
    with pytest.raises(BadRecordError, match=r"row 2, field 'a': 1 values for the 2 columns"):
        records_from_source(_src(p))


def test_wrong_csv_columns_in_skip_mode_name_the_field(tmp_path):
    p = tmp_path / "pool.csv"
    p.write_text("question,answer\nwhat?,that\nwhy?,because\n")
    with pytest.raises(
        BadRecordError,
        match=r"pool\.csv, row 1, field 'q': all 2 rows are bad \(first: missing field "
        r"\(row has \['answer', 'question'\]\)\): the source does not match the file",
    ):
        records_from_source(_src(p), on_bad_row="skip")


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("pool.jsonl", b"", "empty file"),
        ("pool.jsonl", b"\n  \n", "empty file"),
        ("pool.csv", b"", "empty file"),
        ("pool.csv", b"q,a\n", "no data rows"),
        ("pool.json", b"", "empty file"),
    ],
)
def test_empty_file_is_named(tmp_path, name, content, problem):
    p = tmp_path / name
    p.write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(BadRecordError, match=rf"{p}: {problem}"):
            records_from_source(_src(p), on_bad_row=mode)


def test_empty_pool_names_the_step(tmp_path, tiny_tokenizer):
    p = tmp_path / "pool.jsonl"
    p.write_text('{"q": "a", "a": "b", "kind": "x"}\n{"q": "c", "a": "d", "kind": "x"}\n')
    filtered = {"name": "t", "sources": [_src(p, filter={"kind": "y"})]}
    with pytest.raises(ValueError, match=r"domain 't': the train pool is empty after reading and "
                       r"filtering its sources \(counts: \{'t:filtered': 2"):  # fmt: skip
        load_records(filtered, {})
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"question": "a"}\n{"question": "c"}\n')
    overlap = {
        "name": "t",
        "sources": [_src(p)],
        "decontaminate": [{"path": str(evals), "field": "question"}],
    }
    with pytest.raises(ValueError, match=r"empty after decontamination .*'t:eval_overlap': 2"):
        load_records(overlap, {})
    from grads.data.pool import load_pool

    cfg = {"domain": {"name": "t", "sources": [_src(p)]}, "data": {"max_seq_len": 2}}
    with pytest.raises(ValueError, match=r"empty after tokenising to data.max_seq_len=2"):
        load_pool(cfg, tiny_tokenizer)


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
# After the held-out split (grads.data.heldout: 300 distinct samples, whole key groups) is removed.
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
    from grads.data import synthetic

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
