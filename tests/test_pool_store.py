"""The streamed pool: records read one at a time, tokenised into a memory-mapped Arrow store.

What must not change when the pool streams: the samples and their order (equal to tokenising the
listed records), the held-out split and ``pool_limit`` (equal to the whole-list algorithms), bad
rows named by file and row; and what streaming adds: the store is a file under
``<cache_dir>/pools`` that is removed with its dataset, one store per pipeline run, leftovers of
killed runs cleaned, and an export that reads a large pool as a sample.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grads.data import heldout
from grads.data.pool import (
    iter_pool_records,
    load_pool,
    load_records,
    new_store_dir,
    shared_pools,
    tokenize_records,
)
from grads.data.readers import BadRecordError
from grads.data.records import Record, sample_id
from tests.conftest import compose


def _rows(n: int, dup_every: int = 0) -> list[dict]:
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
        for i in range(n)
    ]
    if dup_every:
        rows += [dict(rows[i]) for i in range(0, n, dup_every)]  # exact copies, later in the file
    return rows


def _pool_file(tmp: Path, rows: list) -> Path:
    path = tmp / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp: Path, path: Path, *overrides: str) -> dict:
    cfg = compose(["domain=custom", f"domain.path={path}", "model=tiny", *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["paths"]["cache_dir"] = str(tmp / "cache")
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    from grads.models import load_model

    return load_model(OmegaConf.to_container(compose(["model=tiny"]).model, resolve=True))[1]


def test_the_store_holds_the_listed_records_tokenised_in_order(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, _pool_file(tmp_path, _rows(300, dup_every=7)))
    pool, stats = load_pool(cfg, tokenizer, return_stats=True)
    records, counts = load_records(cfg["domain"], cfg["data"])
    expected, _ = tokenize_records(records, tokenizer, cfg["data"])
    assert len(pool) == len(expected) == 300 and stats["duplicates_removed"] == 43
    assert pool["id"] == [s["id"] for s in expected]
    for i in (0, 17, 299):
        row = pool[i]
        for col in ("input_ids", "labels", "response_ids", "n_prompt", "n_response", "source"):
            assert row[col] == expected[i][col], col
    # memory-mapped from one file under the cache root, not held in memory
    (store,) = {f["filename"] for f in pool.cache_files}
    assert Path(store).parent.parent == tmp_path / "cache" / "pools"
    assert counts.items() <= stats.items()


def test_the_store_is_removed_with_its_dataset_or_at_the_end_of_the_run(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, _pool_file(tmp_path, _rows(50)))
    pools = tmp_path / "cache" / "pools"
    pool = load_pool(cfg, tokenizer)
    assert len(list(pools.iterdir())) == 1
    del pool
    gc.collect()
    assert not list(pools.iterdir())
    with shared_pools():
        a, b = load_pool(cfg, tokenizer), load_pool(cfg, tokenizer)
        assert a is b and len(list(pools.iterdir())) == 1  # one tokenisation per run
        other = load_pool({**cfg, "data": {**cfg["data"], "max_seq_len": 64}}, tokenizer)
        assert other is not a and len(list(pools.iterdir())) == 2
    assert not list(pools.iterdir())


def test_a_killed_runs_store_is_removed_by_the_next_run(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    root = tmp_path / "cache" / "pools"
    left = root / f"{socket.gethostname()}-{dead}-abc123"
    left.mkdir(parents=True)
    (left / "pool.arrow").write_bytes(b"x")
    live = root / f"{socket.gethostname()}-{os.getppid()}-def456"  # a running process's
    live.mkdir()
    other_host = root / "elsewhere-1-ghi789"
    other_host.mkdir()
    new = new_store_dir(tmp_path / "cache")
    assert not left.exists() and live.exists() and other_host.exists() and new.exists()


def test_a_bad_row_is_named_by_file_and_row_when_streaming(tmp_path, tokenizer):
    rows = _rows(20)
    rows[12]["output"] = ""
    path = _pool_file(tmp_path, rows)
    with pytest.raises(BadRecordError, match=r"pool\.jsonl, row 13, field 'output': empty"):
        load_pool(_cfg(tmp_path, path), tokenizer)
    assert not list((tmp_path / "cache" / "pools").iterdir())  # nothing left behind
    pool, stats = load_pool(_cfg(tmp_path, path, "data.on_bad_row=skip"), tokenizer, True)
    assert len(pool) == 19 and stats["custom:bad_row:empty_field"] == 1


def test_the_stream_holds_no_record_it_has_passed(tmp_path):
    """Records are produced while the file is read: a stream stopped early read only that far."""
    cfg = _cfg(tmp_path, _pool_file(tmp_path, _rows(1000)))
    counts: Counter = Counter()
    stream = iter_pool_records(cfg["domain"], cfg["data"], counts)
    first = [next(stream) for _ in range(3)]
    assert [r.prompt.split("\n")[0] for r in first][0].startswith("Add 0 and 1")
    assert counts["custom:read"] == 3
    stream.close()


def _records(n: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key = f"question {rng.randrange(n // 2)}"  # repeated keys: groups of several samples
        response = f"answer {rng.randrange(3)}"
        out.append(Record(sample_id(key, response), "s", key, response, None, {}))
    return out + out[: n // 10]  # and duplicated records


def _choose_by_sorting(records: list[Record], n: int, salt: str) -> set[str]:
    """The held-out rule spelled out on the whole list: key groups in hash order to n samples."""
    ids: dict[str, set[str]] = {}
    for r in records:
        ids.setdefault(heldout.key_of(r), set()).add(r.id)
    order = sorted(ids, key=lambda k: hashlib.sha1(f"{salt}\x00{k}".encode()).digest())
    chosen, total = set(), 0
    for key in order:
        if total >= n:
            break
        chosen.add(key)
        total += len(ids[key])
    return chosen


@pytest.mark.parametrize("n", [1, 7, 40, 500])
def test_the_held_out_split_chosen_in_one_bounded_pass_equals_sorting_every_key(n):
    records = _records(400, seed=n)
    groups, n_distinct = heldout.first_groups(iter(records), n, "salt")
    assert len(groups) <= n and n_distinct == len({r.id for r in records})
    assert heldout.take_groups(groups, n) == _choose_by_sorting(records, n, "salt")
    assert heldout.choose_keys(records, n, "salt") == _choose_by_sorting(records, n, "salt")


@pytest.mark.parametrize("limit", [1, 25, 299, 300, 1000])
def test_pool_limit_keeps_the_first_samples_in_hash_order_or_the_file_order(tmp_path, limit):
    cfg = _cfg(tmp_path, _pool_file(tmp_path, _rows(300)), f"domain.pool_limit={limit}")
    records, counts = load_records(cfg["domain"], cfg["data"])
    whole, _ = load_records({**cfg["domain"], "pool_limit": None}, cfg["data"])
    if limit < 300:
        order = sorted(whole, key=lambda r: hashlib.sha1((r.id + "0").encode()).digest())
        assert [r.id for r in records] == [r.id for r in order[:limit]]
        assert counts["pool_limited_to"] == limit
    else:
        assert [r.id for r in records] == [r.id for r in whole] and "pool_limited_to" not in counts


def test_export_of_a_pool_larger_than_its_sample(tmp_path, monkeypatch):
    """Above ``POOL_SAMPLE`` records the composition reads a uniform sample of the pool (and the
    whole subset); every selected record is still exported and every pool id scored."""
    import grads.export as export
    from tests.test_export import _select_and_export

    monkeypatch.setattr(export, "POOL_SAMPLE", 40)
    cfg = _cfg(tmp_path, _pool_file(tmp_path, _rows(200)), "selector=gradnorm", "budget=p25")
    records, _ = load_records(cfg["domain"], cfg["data"])
    manifest = _select_and_export(cfg, records, tmp_path)
    comp = manifest["composition"]
    assert comp["settings"]["pool_sampled"] is True and comp["settings"]["pool_sample"] == 40
    assert sum(comp["groups"]["template"]["pool"].values()) == 40
    assert sum(comp["groups"]["template"]["subset"].values()) == 50
    lines = (tmp_path / "export" / "selected.jsonl").read_text().splitlines()
    assert len(lines) == manifest["rows"] == 50
    import pandas as pd

    scores = pd.read_parquet(tmp_path / "export" / "scores.parquet")
    assert len(scores) == 200 and scores["selected"].sum() == 50


def test_a_kept_store_is_reused_and_never_half_written(tmp_path, tokenizer, monkeypatch):
    """The warm-up keeps its store in its own folder; the stages after it open that file (no
    tokenisation), and a build that fails leaves no ``pool.arrow`` there."""
    import grads.data.pool as pool_mod

    cfg = _cfg(tmp_path, _pool_file(tmp_path, _rows(60)))
    warm = tmp_path / "warmup"
    warm.mkdir()
    monkeypatch.setattr(pool_mod, "tokenize_batch", _failing(pool_mod.tokenize_batch))
    with pytest.raises(RuntimeError, match="killed"):
        load_pool(cfg, tokenizer, keep_in=warm)
    assert not list(warm.iterdir())
    monkeypatch.undo()
    kept, stats = load_pool(cfg, tokenizer, return_stats=True, keep_in=warm)
    assert sorted(p.name for p in warm.iterdir()) == ["pool.arrow", "pool.json"]
    monkeypatch.setattr(pool_mod, "write_store", _failing(pool_mod.write_store))  # no rebuild
    again, stats2 = load_pool(cfg, tokenizer, return_stats=True, reuse_from=warm)
    assert again["id"] == kept["id"] and stats2 == json.loads(json.dumps(stats))
    assert {f["filename"] for f in again.cache_files} == {str(warm / "pool.arrow")}
    monkeypatch.undo()
    fresh = load_pool(cfg, tokenizer, reuse_from=tmp_path / "elsewhere")  # nothing kept there
    assert fresh["id"] == kept["id"]


def _failing(fn):
    def wrapper(*args, **kwargs):
        raise RuntimeError("killed")

    return wrapper
