"""Bad rows in a pool, as a user meets them: bytes that are not UTF-8 in every reader (an error
naming file, row, byte offset and line; skipped and counted in skip mode), per-kind skip counts of a
custom pool in metrics.json with the first skipped rows logged, and a missing ``domain.path``."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grads.data.custom_pool import records_from_custom
from grads.data.readers import BadRecordError
from grads.data.records import LOGGED_BAD_ROWS, records_from_source
from tests.conftest import compose

GOOD = [{"instruction": f"Name the colour number {i}.", "output": f"Colour {i}."} for i in range(3)]


def _custom(path: Path) -> dict:
    cfg = compose(["domain=custom", f"domain.path={path}", "domain.prompt=instruction"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["domain"]["sources"][0]["response"] = "{output}"
    return cfg["domain"]["sources"][0]


def _offset(data: bytes, byte: int) -> tuple[int, int]:
    """Offset and line of the one ``byte`` in ``data`` (computed from the file, not hard-coded)."""
    assert data.count(bytes([byte])) == 1
    at = data.index(bytes([byte]))
    return at, data[:at].count(b"\n") + 1


def _jsonl(rows: list[bytes]) -> bytes:
    return b"".join(r + b"\n" for r in rows)


def _good_lines() -> list[bytes]:
    return [json.dumps(r).encode() for r in GOOD]


# Each text layout with one undecodable byte (0xe9) in row 2's `output`: (file, bytes, row).
LAYOUTS = {
    "pool.jsonl": (
        _jsonl(
            [_good_lines()[0], b'{"instruction": "Say hi.", "output": "caf\xe9"}', _good_lines()[1]]
        ),
        2,
    ),
    "pool.json": (
        b"[\n" + _good_lines()[0] + b",\n"
        b'  {"instruction": "Say hi.",\n   "output": "caf\xe9"},\n' + _good_lines()[1] + b"\n]\n",
        2,
    ),
    "pool.csv": (
        b'instruction,output\nName one.,One.\n"Say\nhi.",caf\xe9\nName two.,Two.\n',
        2,
    ),
    "pool.tsv": (b"instruction\toutput\r\nName one.\tOne.\r\nSay hi.\tcaf\xe9\r\nTwo?\t2.\r\n", 2),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_undecodable_byte_names_file_row_offset_and_line(tmp_path, name):
    data, row = LAYOUTS[name]
    pool = tmp_path / name
    pool.write_bytes(data)
    offset, line = _offset(data, 0xE9)
    with pytest.raises(BadRecordError) as err:
        records_from_custom(_custom(pool))
    e = err.value
    assert (e.file, e.row, e.field, e.kind) == (str(pool), row, "output", "not_utf8")
    assert f"not valid UTF-8 (byte 0xe9 at byte offset {offset}, line {line})" in str(e)
    assert str(e).startswith(f"{pool}, row {row}, field 'output'")
    counts = Counter()
    recs = records_from_custom(_custom(pool), on_bad_row="skip", counts=counts)
    assert len(recs) == 2 and "caf" not in " ".join(r.response for r in recs)
    assert counts == Counter({"custom:bad_row": 1, "custom:bad_row:not_utf8": 1})


def test_undecodable_byte_in_a_field_the_templates_do_not_use(tmp_path):
    """A custom pool's row is exported whole, so any field counts; a domain source only reads
    its template fields (a stray byte elsewhere is harmless there)."""
    pool = tmp_path / "pool.jsonl"
    bad = b'{"instruction": "Say hi.", "output": "Hi.", "note": "\xff"}'
    data = _jsonl([_good_lines()[0], bad])
    pool.write_bytes(data)
    offset, _ = _offset(data, 0xFF)
    with pytest.raises(
        BadRecordError, match=rf"row 2, field 'note': .*byte offset {offset}, line 2"
    ):
        records_from_custom(_custom(pool))
    src = {"name": "s", "path": str(pool), "prompt": "{instruction}", "response": "{output}"}
    assert len(records_from_source(src)) == 2


def test_two_bad_bytes_in_a_row_point_at_the_field_named(tmp_path):
    pool = tmp_path / "pool.jsonl"
    data = _jsonl([b'{"note": "\xfe", "instruction": "caf\xe9", "output": "x"}'])
    pool.write_bytes(data)
    src = {"name": "s", "path": str(pool), "prompt": "{instruction}", "response": "{output}"}
    offset, _ = _offset(data, 0xE9)
    with pytest.raises(
        BadRecordError, match=rf"field 'instruction': .*0xe9 at byte offset {offset},"
    ):
        records_from_source(src)


def test_bad_field_names_and_lone_surrogates_are_bad_rows_too(tmp_path):
    """A bad byte in a field name is named printably (``\\xe9``); a JSON escape of a lone
    surrogate cannot be text either: both are ``not_utf8`` rows, not a crash in ``sample_id``."""
    pool = tmp_path / "pool.jsonl"
    data = _jsonl(
        [
            _good_lines()[0],
            b'{"instruction": "Say hi.", "output": "x", "caf\xe9": 1}',
            b'{"instruction": "Say \\ud800.", "output": "x"}',
        ]
    )
    pool.write_bytes(data)
    offset, _ = _offset(data, 0xE9)
    with pytest.raises(BadRecordError) as err:
        records_from_custom(_custom(pool))
    assert str(err.value) == (
        f"{pool}, row 2, field 'caf\\xe9': not valid UTF-8 (byte 0xe9 at byte offset {offset}, "
        "line 2)"
    )
    str(err.value).encode("utf-8")  # printable
    counts = Counter()
    assert len(records_from_custom(_custom(pool), on_bad_row="skip", counts=counts)) == 1
    assert counts["custom:bad_row:not_utf8"] == 2


def test_undecodable_strings_in_parquet_and_datasets_folders(tmp_path):
    """Arrow strings written unchecked: the row and column are named, not a crash of the table."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = [b"Red.", b"caf\xe9", b"Blue."]
    table = pa.table(
        {
            "instruction": ["One?", "Two?", "Three?"],
            "output": pa.array(raw, type=pa.binary()).cast(pa.string(), safe=False),
        }
    )
    pq.write_table(table, tmp_path / "pool.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "pool.parquet", tmp_path / "saved"):
        with pytest.raises(BadRecordError) as err:
            records_from_custom(_custom(path))
        assert (err.value.row, err.value.field, err.value.kind) == (2, "output", "not_utf8")
        assert "byte 0xe9 at byte 3 of the value" in str(err.value)
        counts = Counter()
        recs = records_from_custom(_custom(path), on_bad_row="skip", counts=counts)
        assert [r.response for r in recs] == ["Red.", "Blue."]
        assert counts["custom:bad_row:not_utf8"] == 1


# --------------------------------------------------------------------------------------------------
# Skip mode end to end: per-kind counts in metrics.json, the first rows logged
# --------------------------------------------------------------------------------------------------
TINY = [
    "model=tiny",
    "logger=none",
    "data.max_seq_len=64",
    "trainer.micro_batch_size=8",
    "warmup.max_steps=2",
    "features.batch_size=8",
    "stages=[warmup,features,select]",
]


def test_custom_pool_skip_counts_every_kind_in_metrics_json(tmp_path, caplog):
    from grads.pipeline import run

    good = [
        json.dumps({"instruction": f"Question {i}: what is {i} plus one?", "output": f"{i + 1}."})
        for i in range(24)
    ]
    bad = [
        b'{"instruction": "broken", "output": ',  # invalid_json
        b'{"instruction": "caf\xe9?", "output": "x"}',  # not_utf8
        b'{"instruction": "Q?", "note": "\xff", "output": "x"}',  # not_utf8, unused field
        b'["a", "list"]',  # not_an_object
        b'{"output": "no instruction"}',  # missing_field
        b'{"instruction": "", "output": "x"}',  # empty_field
        b'{"instruction": ["x"], "output": "x"}',  # wrong_type
    ]
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(
        _jsonl([g.encode() for g in good[:12]] + bad + [g.encode() for g in good[12:]])
    )
    cfg = compose(
        [
            "domain=custom",
            f"domain.path={pool}",
            "domain.prompt=instruction",
            "domain.response=output",
            "data.on_bad_row=skip",
            "budget=p25",
            *TINY,
            f"paths.output_dir={tmp_path}",
        ]
    )
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="grads.data.pool"):
            m = run(cfg)
    finally:
        os.chdir(cwd)
    want = {
        "custom:bad_row": 7,
        "custom:bad_row:invalid_json": 1,
        "custom:bad_row:not_utf8": 2,
        "custom:bad_row:not_an_object": 1,
        "custom:bad_row:missing_field": 1,
        "custom:bad_row:empty_field": 1,
        "custom:bad_row:wrong_type": 1,
    }
    metrics = json.loads(next(tmp_path.glob("outputs/runs/*/*/metrics.json")).read_text())
    assert {k: v for k, v in metrics["data"].items() if "bad_row" in k} == want
    assert metrics["data"]["custom:read"] == 24 and m["n_pool"] == 24
    skipped = [r.getMessage() for r in caplog.records if "skipped a bad row" in r.getMessage()]
    # one run reads the pool in more than one stage: each read logs its first rows
    rows = {int(s.split(", row ")[1].split(",")[0].split(":")[0]) for s in skipped}
    assert rows == set(range(13, 13 + LOGGED_BAD_ROWS))
    assert all(str(pool) in s for s in skipped)
    assert any("skipping more bad rows" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------
# A missing pool path
# --------------------------------------------------------------------------------------------------
def test_missing_absolute_domain_path_is_named_not_the_data_root(tmp_path, monkeypatch):
    from grads.config import ConfigError, validate_config

    monkeypatch.setenv("GRADS_DATA_DIR", str(tmp_path / "no_data_here"))
    missing = tmp_path / "nope" / "pool.jsonl"
    overrides = ["domain=custom", "domain.prompt=instruction", "domain.response=output"]
    with pytest.raises(ConfigError) as err:
        validate_config(compose([*overrides, f"domain.path={missing}"]))
    assert f"domain.path: {missing} does not exist" in str(err.value)
    assert "GRADS_DATA_DIR" not in str(err.value) and "data_dir" not in str(err.value)
    # relative: named as given, with where it was looked for
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"domain.path: p.jsonl does not exist \({tmp_path}/p"):
        validate_config(compose([*overrides, "domain.path=p.jsonl"]))
