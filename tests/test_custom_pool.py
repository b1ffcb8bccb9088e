"""The custom domain: pools from the command line in every layout, chat records, errors, export.

The acceptance run (``grads domain=custom domain.path=<jsonl> budget=p10 model=tiny``) runs in a
subprocess like a fresh clone would, then ``datasets.load_from_disk`` reads the export back.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grads.data.custom_pool import fingerprint, pool_files, records_from_custom
from grads.data.pool import IGNORE_INDEX, load_records, tokenize_record
from grads.data.readers import BadRecordError
from tests.conftest import REPO, compose

N_POOL = 40


def alpaca_rows(n: int = N_POOL) -> list[dict]:
    """An Alpaca-style pool; every other ``input`` is empty, as in the real one."""
    return [
        {
            "uid": i,
            "instruction": f"Name the capital of the fictional country Q{i}.",
            "input": "" if i % 2 else f"Q{i} lies on the coast of the northern sea.",
            "output": f"The capital of Q{i} is Port {chr(65 + i % 26)}{i % 7}.",
            "tags": ["geo", f"t{i % 3}"],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def custom(path, **kw) -> dict:
    """The resolved custom domain for ``path`` with ``domain.KEY=VALUE`` overrides."""
    over = [f"domain.{k}={v}" for k, v in kw.items()]
    cfg = compose(["domain=custom", f"domain.path={path}", *over])
    return OmegaConf.to_container(cfg, resolve=True)


def records(path, on_bad_row="error", system=None, **kw):
    cfg = custom(path, **kw)
    data = {"on_bad_row": on_bad_row, "system_prompt": system, "dedup": True}
    return load_records(cfg["domain"], data)


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------
def test_jsonl_with_templates_and_detected_alpaca_fields(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", alpaca_rows())
    recs, stats = records(pool, prompt="'{instruction}\\n{input}'", response="'{output}'")
    assert len(recs) == N_POOL and stats["custom:read"] == N_POOL
    assert (
        recs[0].prompt
        == "Name the capital of the fictional country Q0.\nQ0 lies on the coast of the northern sea."
    )
    assert (
        recs[1].prompt == "Name the capital of the fictional country Q1."
    )  # empty input: stripped
    assert recs[0].response == "The capital of Q0 is Port A0."
    detected, _ = records(pool)  # no templates: the Alpaca pair is recognised
    assert [r.id for r in detected] == [r.id for r in recs]
    bare, _ = records(pool, prompt="instruction", response="output")  # bare field names
    assert bare[1].id == recs[1].id and bare[0].prompt == recs[1].prompt.replace("Q1", "Q0")


def test_every_layout_gives_the_same_records(tmp_path):
    import pandas as pd
    from datasets import Dataset, DatasetDict

    rows = alpaca_rows()
    ref = [r.id for r in records(write_jsonl(tmp_path / "pool.jsonl", rows))[0]]
    flat = [{k: v for k, v in r.items() if k != "tags"} for r in rows]
    pd.DataFrame(flat).to_csv(tmp_path / "pool.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "pool.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):  # sorted by name: part-0, part-1, part-2 hold rows in order
        write_jsonl(shards / f"part-{k}.jsonl", rows[k * 14 : (k + 1) * 14])
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict(
        {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:3])}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    # CSV cells are text: an empty `input` reads as "" or NaN-free None, both fine for optional fields.
    for path in ("pool.csv", "pool.parquet", "shards", "saved", "saved_dict"):
        got = [r.id for r in records(tmp_path / path)[0]]
        assert got == ref, path
    test_split = records(tmp_path / "saved_dict", split="test")[0]
    assert [r.id for r in test_split] == ref[:3]
    with pytest.raises(ValueError, match="single Dataset"):
        records(tmp_path / "saved", split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the folder .*empty has no data files"):
        pool_files(tmp_path / "empty")


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="domain=custom needs a pool: set domain.path"):
        pool_files(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pool_files(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="domain.format='xlsx'"):
        pool_files(tmp_path, "xlsx")


# --------------------------------------------------------------------------------------------------
# Errors: file, row, field
# --------------------------------------------------------------------------------------------------
def test_missing_field_names_the_fields_the_file_has(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", alpaca_rows(3))
    with pytest.raises(BadRecordError) as err:
        records(pool, prompt="'{question}'", response="'{output}'")
    e = err.value
    assert (e.file, e.row, e.field) == (str(pool), 1, "question")
    assert "the file has fields ['input', 'instruction', 'output', 'tags', 'uid']" in str(e)
    # Nothing recognisable and no templates: the error lists the fields and how to set them.
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"a": "x", "b": "y"}])
    with pytest.raises(ValueError, match=r"the file has fields \['a', 'b'\]. Set domain.prompt"):
        records(odd)


@pytest.mark.parametrize(
    ("bad", "row", "field", "problem"),
    [
        ('{"instruction": "q", "output": ""}', 3, "output", "empty string"),
        ('{"instruction": ["q"], "output": "a"}', 3, "instruction", "expected a string, got list"),
        ('{"instruction": "q", "output": null}', 3, "output", "expected a string, got NoneType"),
        ("{not json", 3, None, "invalid JSON"),
        ("[1, 2]", 3, None, "expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_row_field(tmp_path, bad, row, field, problem):
    good = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(2)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join([*good, bad, *good]) + "\n")
    with pytest.raises(BadRecordError) as err:
        records(pool)
    assert (err.value.file, err.value.row, err.value.field) == (str(pool), row, field)
    assert problem in str(err.value)


def test_skip_mode_counts_bad_rows(tmp_path, caplog):
    rows = alpaca_rows(6)
    rows[2]["output"] = ""
    rows[4]["instruction"] = {"nested": True}
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    recs, stats = records(pool, on_bad_row="skip")
    assert len(recs) == 4 and stats["custom:bad_row"] == 2


def test_template_config_errors(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", alpaca_rows(2))
    with pytest.raises(ValueError, match="set both domain.prompt and domain.response"):
        records(pool, prompt="instruction")
    with pytest.raises(ValueError, match="use named fields"):
        records(pool, prompt="'{}'", response="output")
    with pytest.raises(ValueError, match="domain.mode='xml'"):
        records(pool, mode="xml")


# --------------------------------------------------------------------------------------------------
# Multi-turn chat records
# --------------------------------------------------------------------------------------------------
def chat_rows() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Capital of Q1?"},
                {"role": "assistant", "content": "Port B1."},
                {"role": "user", "content": "And of Q2?"},
                {"role": "assistant", "content": "Port C2."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        # ShareGPT layout
        {
            "conversations": [
                {"from": "human", "value": "Q3?"},
                {"from": "gpt", "value": "Port D3."},
            ]
        },
    ]


def test_chat_records_are_taken_as_they_are(tmp_path, tiny_tokenizer):
    rows = chat_rows()
    pool = write_jsonl(tmp_path / "chat.jsonl", rows[:2])
    recs, _ = records(pool, system="Default system.")
    first = recs[0]
    assert first.system == "You are terse."  # the record's own system turn wins
    assert first.response == "Port C2." and "user: And of Q2?" in first.prompt
    assert recs[1].system == "Default system."
    sample = tokenize_record(first, tiny_tokenizer, max_seq_len=512)
    supervised = [t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE_INDEX]
    # Only the last assistant turn is supervised; the earlier turns are context.
    assert tiny_tokenizer.decode(supervised).startswith("Port C2.")
    full = tiny_tokenizer.decode(sample["input_ids"])
    assert full.count("<|im_start|>assistant") == 2 and "You are terse." in full
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", rows[2:])
    (rec,), _ = records(sharegpt)
    assert rec.meta["messages"] == [
        {"role": "user", "content": "Q3?"},
        {"role": "assistant", "content": "Port D3."},
    ]


@pytest.mark.parametrize(
    ("messages", "field", "problem"),
    [
        ([{"role": "user", "content": "q"}], "messages", "last turn must be the assistant's"),
        (
            [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}],
            "messages[1].role",
            "unknown role",
        ),
        (
            [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}],
            "messages[0].content",
            "empty string",
        ),
        ("hello", "messages", "expected a non-empty list of turns, got str"),
        ([{"role": "assistant", "content": "a"}], "messages", "no user turn"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ],
            "messages[1]",
            "only allowed first",
        ),
    ],
)
def test_bad_chat_rows(tmp_path, messages, field, problem):
    pool = write_jsonl(tmp_path / "chat.jsonl", [chat_rows()[1], {"messages": messages}])
    with pytest.raises(BadRecordError) as err:
        records(pool)
    assert (err.value.row, err.value.field) == (2, field) and problem in str(err.value)


# --------------------------------------------------------------------------------------------------
# Cache key and export
# --------------------------------------------------------------------------------------------------
def test_cache_key_follows_the_pool_content(tmp_path):
    from grads.pipeline import stage_keys

    pool = write_jsonl(tmp_path / "pool.jsonl", alpaca_rows())
    cfg = custom(pool)
    before = stage_keys(cfg)["warmup"]
    assert stage_keys(custom(pool))["warmup"] == before
    old_print = fingerprint(pool)
    write_jsonl(pool, alpaca_rows()[:-1])  # same name, new content
    assert fingerprint(pool) != old_print
    assert stage_keys(custom(pool))["warmup"] != before
    with pytest.raises(ValueError, match="domain.path"):
        stage_keys(OmegaConf.to_container(compose(["domain=custom"]), resolve=True))


def test_heldout_split_of_a_custom_pool(tmp_path):
    """Runs that evaluate set 5 % of the distinct samples (at most 300) aside, chosen by content,
    and write them for the grads_heldout task; the pool loses exactly those."""
    from grads.config import validate_config
    from grads.data.heldout import materialise

    pool = write_jsonl(tmp_path / "pool.jsonl", alpaca_rows())
    over = ["domain=custom", f"domain.path={pool}", f"paths.output_dir={tmp_path / 'out'}"]
    cfg = OmegaConf.to_container(validate_config(compose(over)), resolve=True)
    assert cfg["domain"]["heldout"] == {"n": 300, "max_frac": 0.05, "salt": "grads-heldout-v1"}
    recs, stats = load_records(cfg["domain"], cfg["data"])
    assert len(recs) == N_POOL - 2 and stats["heldout_for_domain_loss"] == 2
    held = [json.loads(x) for x in materialise(cfg).read_text().splitlines()]
    assert len(held) == 2 and not {h["id"] for h in held} & {r.id for r in recs}
    assert {h["response"] for h in held} <= {r["output"] for r in alpaca_rows()}
    # A cap below 5 %: heldout.n wins; grads-select's stages: nothing is set aside.
    small = validate_config(compose([*over, "domain.heldout.n=1"]))
    assert (
        len(load_records(OmegaConf.to_container(small.domain, resolve=True), cfg["data"])[0])
        == N_POOL - 1
    )
    select = validate_config(compose([*over, "stages=[warmup,features,select]"]))
    assert (
        len(load_records(OmegaConf.to_container(select.domain, resolve=True), cfg["data"])[0])
        == N_POOL
    )


def _fake_selection(select_dir: Path, ids: list[str]) -> None:
    from grads.io import write_json, write_jsonl

    select_dir.mkdir(parents=True)
    write_jsonl(
        select_dir / "selection.jsonl",
        [{"id": i, "rank": k, "score": 1.0 / (k + 1)} for k, i in enumerate(ids)],
    )
    write_json(select_dir / "selection.json", {"pool_size": 99})


def test_export_keeps_original_fields_and_renames_clashes(tmp_path):
    from datasets import load_from_disk

    from grads.export import export_selection

    rows = alpaca_rows(6)
    for i, r in enumerate(rows):
        r["id"] = f"user-{i}"  # the user's own id column clashes with ours
        r["extra"] = i if i % 2 else "text"  # mixed types: JSON text in the datasets folder
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)
    cfg = custom(pool)
    recs = records_from_custom(cfg["domain"]["sources"][0])
    _fake_selection(tmp_path / "select", [recs[4].id, recs[1].id])
    cfg |= {"selector": {"name": "grads"}, "budget": {"name": "p10"}, "data": {}}
    manifest = export_selection(cfg, tmp_path / "select", tmp_path / "export")
    lines = [
        json.loads(x) for x in (tmp_path / "export" / "selected.jsonl").read_text().splitlines()
    ]
    assert [x["original_id"] for x in lines] == ["user-4", "user-1"]
    assert [x["rank"] for x in lines] == [0, 1] and lines[1]["score"] == 0.5
    assert lines[0]["tags"] == ["geo", "t1"] and lines[0]["id"] == recs[4].id
    ds = load_from_disk(str(tmp_path / "export" / "selected"))
    assert ds.num_rows == 2 and ds.column_names == manifest["fields"]
    assert ds[1]["extra"] == "1" and ds[0]["extra"] == "text"
    assert set(ds.column_names) == {*rows[0], "original_id", "score", "rank"}


def test_export_of_chat_records_keeps_the_turns(tmp_path):
    from datasets import load_from_disk

    from grads.export import export_selection

    pool = write_jsonl(tmp_path / "chat.jsonl", chat_rows()[:2])
    cfg = custom(pool)
    recs = records_from_custom(cfg["domain"]["sources"][0])
    _fake_selection(tmp_path / "select", [recs[1].id, recs[0].id])
    cfg |= {"selector": {"name": "grads"}, "budget": {"name": "p50"}, "data": {}}
    export_selection(cfg, tmp_path / "select", tmp_path / "export")
    ds = load_from_disk(str(tmp_path / "export" / "selected"))
    assert ds.column_names == ["messages", "id", "score", "rank"]
    assert ds[0]["messages"] == chat_rows()[1]["messages"]
    assert ds[1]["messages"][0] == {"role": "system", "content": "You are terse."}


def test_export_of_a_builtin_domain_has_chat_messages(tmp_path):
    from grads.export import export_selection

    cfg = OmegaConf.to_container(
        compose(["domain=synthetic", f"paths.output_dir={tmp_path}", "domain.pool_limit=20"]),
        resolve=True,
    )
    from grads.data.pool import materialise_generated

    materialise_generated(cfg["domain"], cfg)
    recs, _ = load_records(cfg["domain"], cfg["data"])
    _fake_selection(tmp_path / "select", [recs[3].id])
    export_selection(cfg, tmp_path / "select", tmp_path / "export")
    (row,) = [
        json.loads(x) for x in (tmp_path / "export" / "selected.jsonl").read_text().splitlines()
    ]
    assert row["prompt"] == recs[3].prompt and row["messages"][-1] == {
        "role": "assistant",
        "content": recs[3].response,
    }
    assert {"id", "score", "rank", "source", "response", "system"} <= set(row)


# --------------------------------------------------------------------------------------------------
# Acceptance: the command line, end to end, then load_from_disk
# --------------------------------------------------------------------------------------------------
TINY_CLI = [
    "model=tiny",
    "logger=none",
    "data.max_seq_len=64",
    "trainer.micro_batch_size=8",
    "warmup.max_steps=2",
    "features.batch_size=8",
]


def _cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("custom_cli")
    pool = write_jsonl(tmp / "pool.jsonl", alpaca_rows())
    out = _cli(
        "grads.cli.main",
        [
            "domain=custom",
            "domain.path=pool.jsonl",  # relative to the working directory, as users type it
            "domain.prompt='{instruction}\\n{input}'",
            "domain.response='{output}'",
            "budget=p10",
            *TINY_CLI,
            "finetune.max_steps=1",
            "eval.general_tasks=[]",
            f"paths.output_dir={tmp / 'out'}",
        ],
        cwd=tmp,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, pool


def test_grads_custom_writes_jsonl_and_datasets_folder(cli_run):
    from datasets import load_from_disk

    tmp, pool = cli_run
    metrics = json.loads(next((tmp / "out" / "runs").rglob("metrics.json")).read_text())
    export = Path(metrics["export"]["dataset"]).parent
    assert export.parent == next((tmp / "out" / "runs").rglob("metrics.json")).parent
    k = math.ceil(0.1 * N_POOL)
    ds = load_from_disk(str(export / "selected"))
    assert ds.num_rows == k == metrics["n_selected"]
    assert ds.column_names == [
        "uid",
        "instruction",
        "input",
        "output",
        "tags",
        "id",
        "score",
        "rank",
    ]
    assert ds["rank"] == list(range(k))
    originals = {r["uid"]: r for r in alpaca_rows()}
    lines = [json.loads(x) for x in (export / "selected.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ds["id"]
    for x in lines:  # every original field, unchanged
        assert {f: x[f] for f in originals[x["uid"]]} == originals[x["uid"]]
    sel = [
        json.loads(x)
        for x in (Path(metrics["artefacts"]["select"]) / "selection.jsonl").read_text().splitlines()
    ]
    assert [s["id"] for s in sel] == ds["id"] and [s["score"] for s in sel] == ds["score"]
    assert (export / "selection.png").stat().st_size > 1000


def test_grads_select_stops_after_select_and_exports_where_asked(cli_run):
    tmp, _ = cli_run
    out = _cli(
        "grads.cli.select",
        [
            "domain=custom",
            "domain.path=pool.jsonl",
            "domain.prompt='{instruction}\\n{input}'",
            "domain.response='{output}'",
            "budget=p25",
            *TINY_CLI,
            f"paths.output_dir={tmp / 'out'}",
            "export.dir=my_subset",
        ],
        cwd=tmp,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "selected 10 of 40 records" in out.stdout
    manifest = json.loads((tmp / "my_subset" / "export.json").read_text())
    assert manifest["rows"] == 10 and manifest["pool"]["mode"] == "template"
    runs = sorted((tmp / "out" / "runs").rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    m = json.loads(runs[-1].read_text())
    assert m["stages"] == ["warmup", "features", "select"]
    # The `grads` run above evaluated, so it set 5 % of the pool aside for the held-out loss; this
    # run does not evaluate and keeps every record a candidate (its own warm-up).
    full = json.loads(runs[0].read_text())
    assert full["data"]["heldout_for_domain_loss"] == 2 and full["n_pool"] == N_POOL - 2
    assert m["n_pool"] == N_POOL and "heldout_for_domain_loss" not in m["data"]
    assert m["cache_hits"] == []
