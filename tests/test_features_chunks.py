"""The features pass in chunks of the pool: batch order, the table against a one-chunk pass and the
pre-chunking path, recorded rows merged by id, each rank reading its share, atomic writing.

Tolerance where batches differ (a chunk smaller than the pool, or two processes): 1e-5, relative or
absolute. A sample batched with other samples is padded to another length, so its float32 sums run
over other shapes and round differently (about 1e-7 relative); the std of near-constant per-token
values is only absolutely close. Where batches are the same the values must be equal exactly.
"""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import grads.features.gradients as gradients
from grads.features.compute import (
    compute_shard,
    features_settings,
    run_features,
    run_features_from_config,
)
from grads.features.store import arrow_table
from grads.io import read_json
from grads.launch import run_distributed
from grads.models import build_tiny
from tests.test_features import CFG, make_pool

torch.set_num_threads(1)
TIMING_KEYS = {"wall_time_s", "feature_time_s", "ifd_time_s", "tokens_per_s", "samples_per_s"}
# features.json as the pass wrote it before it worked in chunks
SUMMARY_KEYS = [
    "source", "n_samples", "n_recorded", "n_computed", "n_resumed", "n_no_supervised_tokens",
    "no_supervised_ids", "n_nan_rows", "columns", "tied", "stats", "ifd", "batch_size",
    "padding_side", "device", "world_size", "tokens_processed", "supervised_tokens",
    "wall_time_s", "feature_time_s", "ifd_time_s", "tokens_per_s", "samples_per_s", "per_rank",
]  # fmt: skip
# a warm-up's recorded table holds no IFD (features.source=warmup forbids it)
REC_CFG = {**CFG, "features": {**CFG["features"], "ifd": False}}


class BatchLog(list):
    """The pool indices of every batch scored since :meth:`use` (nothing is logged before)."""

    def __init__(self) -> None:
        super().__init__()
        self.index_of: dict[tuple, int] = {}

    def use(self, pool: list[dict]) -> None:
        self.index_of = {tuple(s["input_ids"]): i for i, s in enumerate(pool)}
        assert len(self.index_of) == len(pool), "test pool: token sequences must differ"
        self.clear()


@pytest.fixture
def batches(monkeypatch) -> BatchLog:
    log, real = BatchLog(), gradients.per_sample_grad_norms

    def logged(model, input_ids, attention_mask, labels, **kw):
        if log.index_of:
            rows = zip(input_ids, attention_mask)
            log.append([log.index_of[tuple(ids[m.bool()].tolist())] for ids, m in rows])
        return real(model, input_ids, attention_mask, labels, **kw)

    monkeypatch.setattr(gradients, "per_sample_grad_norms", logged)
    return log


def sorted_batches(pool: list[dict], indices: list[int], bs: int) -> list[list[int]]:
    """Longest first, ties by index, cut into batches of ``bs``: the pass's order over ``indices``."""
    order = sorted(indices, key=lambda i: (-len(pool[i]["input_ids"]), i))
    return [order[s : s + bs] for s in range(0, len(order), bs)]


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def assert_rows(got: list[dict], want: list[dict], exact: bool) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want):
        assert list(a) == list(b)
        for c in a:
            if exact or c in ("id", "n_tokens"):
                assert same(a[c], b[c]), (a["id"], c, a[c], b[c])
            else:
                assert a[c] == pytest.approx(b[c], rel=1e-5, abs=1e-5, nan_ok=True), (a["id"], c)


def table_of(folder) -> pa.Table:
    return pq.read_table(folder / "features.parquet")


@pytest.mark.parametrize("as_dataset", [False, True])
def test_one_chunk_sorts_and_batches_as_the_whole_pool(tmp_path, batches, as_dataset):
    """chunk >= pool: the batches of one sort over the pool, and the table the pre-chunking path
    wrote (every row scored by one ``compute_shard`` call, rows in pool order, types inferred)."""
    model, tok = build_tiny(tied=True)
    pool = make_pool(13, seed=2)
    data = pool
    if as_dataset:  # stored reversed + an indices mapping back: ids and lengths follow the mapping
        datasets = pytest.importorskip("datasets")
        data = datasets.Dataset.from_list(pool[::-1]).select(range(len(pool) - 1, -1, -1))
    batches.use(pool)
    summary = run_features(CFG, model, tok, data, tmp_path, chunk_size=len(pool))
    assert batches == sorted_batches(pool, list(range(len(pool))), CFG["features"]["batch_size"])

    fcfg = features_settings(CFG)
    rows, _ = compute_shard(fcfg, model, tok.pad_token_id, "right", pool, list(range(len(pool))),
                            progress=False, prefix_id=tok.bos_token_id)  # fmt: skip
    old = arrow_table([row for _, row in sorted(rows, key=lambda x: x[0])], summary["columns"])
    got = table_of(tmp_path)
    assert got.schema == old.schema
    assert_rows(got.to_pylist(), old.to_pylist(), exact=True)
    assert pq.ParquetFile(tmp_path / "features.parquet").num_row_groups == 1
    assert list(read_json(tmp_path / "features.json")) == SUMMARY_KEYS


def test_chunks_smaller_than_the_pool(tmp_path, batches, caplog):
    """Chunk of 4 samples: sorted and batched within each chunk, one row group per chunk, the table
    and summary of a one-chunk pass (values within 1e-5: other batches, other padding)."""
    model, tok = build_tiny(tied=True)
    pool = make_pool(13, seed=2)
    bs = CFG["features"]["batch_size"]
    one = run_features(CFG, model, tok, pool, tmp_path / "one", chunk_size=100)
    batches.use(pool)
    caplog.clear()
    with caplog.at_level("WARNING"):
        four = run_features(CFG, model, tok, pool, tmp_path / "four", chunk_size=4)
    want = [
        b for s in range(0, 13, 4) for b in sorted_batches(pool, list(range(s, min(s + 4, 13))), bs)
    ]
    assert batches == want
    assert caplog.text.count("no supervised token") == 1  # once for the pass, not per chunk
    meta = pq.ParquetFile(tmp_path / "four" / "features.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 4, 1]
    got, ref = table_of(tmp_path / "four"), table_of(tmp_path / "one")
    assert got.schema == ref.schema
    assert_rows(got.to_pylist(), ref.to_pylist(), exact=False)
    assert {k: v for k, v in four.items() if k not in TIMING_KEYS | {"per_rank"}} == {
        k: v for k, v in one.items() if k not in TIMING_KEYS | {"per_rank"}
    }
    assert four["n_no_supervised_tokens"] == 1 and four["no_supervised_ids"] == ["s4"]
    assert four["per_rank"][0]["samples"] == four["n_computed"] == 13


@pytest.mark.parametrize("as_list", [False, True])
def test_recorded_rows_merge_chunk_by_chunk(tmp_path, batches, as_list):
    """features.source=warmup with a fraction: recorded rows (found by id, whatever their order)
    taken as they are, the others scored, chunk by chunk in pool order."""
    model, tok = build_tiny(tied=True)
    pool = make_pool(13, seed=2)
    run_features(REC_CFG, model, tok, pool, tmp_path / "full", chunk_size=100)
    full = table_of(tmp_path / "full").to_pylist()
    picked = [11, 0, 5, 4, 3]  # s4 has no supervised token: a recorded NaN row
    rec_rows = [{**full[k], "loss": -float(k)} for k in picked]  # marked: must come back as is
    recorded = rec_rows if as_list else pa.Table.from_pylist(rec_rows)
    batches.use(pool)
    summary = run_features(REC_CFG, model, tok, pool, tmp_path / "m", recorded, chunk_size=4)
    rest = [i for i in range(13) if i not in picked]
    bs = REC_CFG["features"]["batch_size"]
    assert batches == [
        b for s in range(0, 13, 4) for b in sorted_batches(pool, [i for i in rest if s <= i < s + 4], bs)
    ]  # fmt: skip
    got = table_of(tmp_path / "m").to_pylist()
    assert_rows([got[k] for k in picked], rec_rows, exact=True)
    assert_rows([got[i] for i in rest], [full[i] for i in rest], exact=False)
    assert summary["source"] == "warmup" and summary["n_samples"] == 13
    assert (summary["n_recorded"], summary["n_computed"]) == (5, 8)
    assert summary["n_no_supervised_tokens"] == 1 and summary["n_nan_rows"] == 1


def test_each_rank_reads_only_its_share(tmp_path, monkeypatch):
    """Rank 1 of 2 reads the rows of its share of each chunk (``rank::world`` of the chunk's samples
    still to score) and nothing else, gathers once per chunk and writes no file."""
    datasets = pytest.importorskip("datasets")
    import torch.distributed as dist

    import grads.dist

    class Reads:  # a Dataset that logs the rows read one by one
        def __init__(self, ds):
            self.ds, self.rows = ds, []

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            self.rows.append(int(i))
            return self.ds[i]

        def select_columns(self, cols):
            return self.ds.select_columns(cols)

        def with_format(self, *args, **kwargs):
            return self.ds.with_format(*args, **kwargs)

    gathers = []
    monkeypatch.setattr(grads.dist, "rank", lambda: 1)
    monkeypatch.setattr(grads.dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "gather_object", lambda obj, lst=None, dst=0: gathers.append(obj))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src=0: None)
    model, tok = build_tiny(tied=True)
    pool = make_pool(13, seed=2)
    data = Reads(datasets.Dataset.from_list(pool))
    recorded = pa.Table.from_pylist([{"id": "s2", "loss": 0.0}, {"id": "s7", "loss": 0.0}])
    run_features(REC_CFG, model, tok, data, tmp_path, recorded, chunk_size=5)
    todo = [[0, 1, 3, 4], [5, 6, 8, 9], [10, 11, 12]]  # chunks of 5 without s2, s7
    assert sorted(data.rows) == sorted(i for chunk in todo for i in chunk[1::2])
    assert len(gathers) == len(todo) + 1  # each chunk's rows, then the timings
    assert sorted(i for part in gathers[:-1] for i, _ in part) == sorted(data.rows)
    assert not list(tmp_path.iterdir())


# ~10 s on an idle 2-core machine, ~30 s when it is shared
def test_two_processes_in_chunks_match_one(tmp_path):
    """2 processes (gloo), a pool of 3 chunks, recorded rows: the table of 1 process."""
    pool = make_pool(13, seed=1)
    cfg = {**REC_CFG, "features": {**REC_CFG["features"], "padding_side": "left"}}
    single = run_features_from_config(cfg, pool, tmp_path / "one", chunk_size=5)
    ref = table_of(tmp_path / "one").to_pylist()
    recorded = pa.Table.from_pylist([{**ref[k], "loss": -1.0} for k in (1, 6, 7)])
    run_distributed("grads.features.compute:run_features_from_config", 2, cfg, pool,
                    str(tmp_path / "two"), recorded=recorded, chunk_size=5)  # fmt: skip
    two = table_of(tmp_path / "two").to_pylist()
    assert [r["loss"] for k, r in enumerate(two) if k in (1, 6, 7)] == [-1.0] * 3
    assert_rows(two, [{**r, "loss": -1.0} if k in (1, 6, 7) else r for k, r in enumerate(ref)],
                exact=False)  # fmt: skip
    summary2 = read_json(tmp_path / "two" / "features.json")
    assert summary2["world_size"] == 2 and summary2["n_samples"] == single["n_samples"] == 13
    assert (summary2["n_recorded"], summary2["n_computed"]) == (3, 10)
    assert sum(p["samples"] for p in summary2["per_rank"]) == 10
    assert pq.ParquetFile(tmp_path / "two" / "features.parquet").num_row_groups == 3


def test_a_failed_pass_leaves_the_old_table_and_resumes_from_its_saved_chunks(
    tmp_path, monkeypatch
):
    """A crash after the first chunk was appended: no partial table under the final name, no
    temporary left behind, a previous table untouched, the finished chunk saved. The next attempt
    scores only the chunks not saved and writes the table an uninterrupted pass writes; a saved
    chunk of another pool is scored again."""
    import pyarrow.parquet as pq

    model, tok = build_tiny(tied=True)
    (tmp_path / "features.parquet").write_bytes(b"previous table")
    real, calls = gradients.per_sample_grad_norms, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # batches of 3, chunks of 4: the first batch of the second chunk
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients, "per_sample_grad_norms", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_features(CFG, model, tok, make_pool(13), tmp_path, chunk_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.chunks", "features.parquet"]
    assert (tmp_path / "features.parquet").read_bytes() == b"previous table"
    assert [p.name for p in (tmp_path / "features.chunks").iterdir()] == ["000000000000.parquet"]

    monkeypatch.setattr(gradients, "per_sample_grad_norms", real)
    resumed = run_features(CFG, model, tok, make_pool(13), tmp_path, chunk_size=4)
    assert resumed["n_resumed"] == 4 and resumed["n_computed"] == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.json", "features.parquet"]
    whole = run_features(CFG, model, tok, make_pool(13), tmp_path / "whole", chunk_size=4)
    assert whole["n_resumed"] == 0
    got, want = (pq.read_table(d / "features.parquet") for d in (tmp_path, tmp_path / "whole"))
    pd.testing.assert_frame_equal(got.to_pandas(), want.to_pandas())  # NaN rows included

    (tmp_path / "other" / "features.chunks").mkdir(parents=True)
    pq.write_table(pq.read_table(tmp_path / "features.parquet").slice(4, 4),
                   tmp_path / "other" / "features.chunks" / "000000000000.parquet")  # fmt: skip
    # (rows 4-7 saved where rows 0-3 belong: another pool's chunk)
    again = run_features(CFG, model, tok, make_pool(13), tmp_path / "other", chunk_size=4)
    assert again["n_resumed"] == 0


def test_features_from_warmup_merges_and_copies_in_chunks(tmp_path, monkeypatch):
    """The features stage with ``features.source=warmup``: a partial recording (the warm-up's
    fraction) is merged with the pass chunk by chunk; a complete one is copied a chunk at a time."""
    import grads.data.pool
    import grads.features.compute as compute
    import grads.training
    from grads.features.store import write_recorded

    model, tok = build_tiny(tied=True)
    pool = make_pool(13, seed=2)
    monkeypatch.setattr(grads.training, "load_trained", lambda *a, **k: (model, tok))
    monkeypatch.setattr(grads.data.pool, "load_pool", lambda cfg, tokenizer, **kw: pool)
    cfg = {**REC_CFG, "features": {**REC_CFG["features"], "source": "warmup", "chunk_size": 4}}
    run_features(REC_CFG, model, tok, pool, tmp_path / "pass", chunk_size=100)
    full = table_of(tmp_path / "pass").to_pylist()
    picked = [1, 2, 9]
    rec_rows = [{**full[k], "loss": -float(k)} for k in picked]
    write_recorded(tmp_path / "part", rec_rows, tied=True, pool_size=13)
    summary = compute.features_from_warmup(cfg, tmp_path / "part", tmp_path / "merged")
    assert (summary["n_recorded"], summary["n_computed"], summary["source"]) == (3, 10, "warmup")
    got = table_of(tmp_path / "merged")
    assert pq.ParquetFile(tmp_path / "merged" / "features.parquet").num_row_groups == 4
    rest = [i for i in range(13) if i not in picked]
    assert_rows([got.to_pylist()[k] for k in picked], rec_rows, exact=True)
    assert_rows([got.to_pylist()[i] for i in rest], [full[i] for i in rest], exact=False)

    write_recorded(tmp_path / "all", full, tied=True, pool_size=13)
    no_stats = {**cfg, "features": {**cfg["features"], "stats": False}}
    copied = compute.features_from_warmup(no_stats, tmp_path / "all", tmp_path / "copied")
    assert copied["n_computed"] == 0 and copied["columns"] == ["id", "loss", "n_tokens", "embed",
                                                                "lm_head", "tied"]  # fmt: skip
    meta = pq.ParquetFile(tmp_path / "copied" / "features.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 4, 1]
    source = pq.read_table(tmp_path / "all" / "features.parquet").to_pylist()
    want = [{c: r[c] for c in copied["columns"]} for r in source]
    assert_rows(table_of(tmp_path / "copied").to_pylist(), want, exact=True)
