"""The features stage: table layout, pool order, IFD, NaN reporting, 2-process run == 1-process run."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from grads.data.pool import collate as _collate
from grads.features.compute import run_features, run_features_from_config
from grads.features.gradients import STAT_KEYS, per_sample_grad_norms
from grads.io import read_json
from grads.launch import run_distributed
from grads.models import build_tiny

torch.set_num_threads(1)


def make_pool(n: int = 11, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pool = []
    for k in range(n):
        p, r = torch.randint(2, 12, (2,), generator=g).tolist()
        prompt = torch.randint(0, 256, (p,), generator=g).tolist()
        resp = torch.randint(0, 256, (r,), generator=g).tolist()
        labels = [-100] * p + resp
        if k == 4:  # nothing supervised: must give a NaN row, not a crash
            labels = [-100] * (p + r)
        pool.append(
            {"id": f"s{k}", "input_ids": prompt + resp, "labels": labels, "response_ids": resp}
        )
    return pool


CFG = {
    "model": {"source": "tiny", "tied": True},
    "features": {"batch_size": 3, "ifd": True, "progress": False, "num_threads": 1},
}


def test_collate_right_and_left():
    samples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    r = _collate(samples, pad_id=0, padding_side="right")
    assert r["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert r["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert r["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    lft = _collate(samples, pad_id=0, padding_side="left")
    assert lft["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert lft["labels"].tolist() == [[-100, 2, 3], [-100, -100, 4]]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_run_features_table(tmp_path, caplog, as_dataset):
    model, tok = build_tiny(tied=True)
    pool = make_pool()
    data = pool
    if as_dataset:
        datasets = pytest.importorskip("datasets")
        # stored reversed + an indices mapping back: lengths must respect the mapping
        data = datasets.Dataset.from_list(pool[::-1]).select(range(len(pool) - 1, -1, -1))
    with caplog.at_level("WARNING"):
        summary = run_features(CFG, model, tok, data, tmp_path)
    assert "no supervised token" in caplog.text
    table = pq.read_table(tmp_path / "features.parquet").to_pylist()
    assert read_json(tmp_path / "features.json")["columns"] == summary["columns"]
    assert [r["id"] for r in table] == [s["id"] for s in pool]  # pool order, not length order
    assert list(table[0]) == [
        "id",
        "loss",
        "n_tokens",
        "embed",
        "lm_head",
        "tied",
        *STAT_KEYS,
        "response_loss",
        "ifd",
    ]
    assert summary["n_samples"] == len(pool) and summary["n_no_supervised_tokens"] == 1
    assert summary["n_nan_rows"] == 1 and summary["no_supervised_ids"] == ["s4"]
    assert summary["tokens_processed"] == sum(len(s["input_ids"]) for s in pool)
    assert summary["tokens_per_s"] > 0 and summary["wall_time_s"] > 0
    assert table[4]["n_tokens"] == 0 and math.isnan(table[4]["embed"])

    for k in (0, 7):  # batched + sorted == alone
        alone = per_sample_grad_norms(model, **_collate([pool[k]], tok.pad_token_id), stats=True)
        for c in ("loss", "embed", "lm_head", "tied", "head_tok_max", "embed_tok_mean"):
            assert table[k][c] == pytest.approx(alone[c].item(), rel=1e-5), c
        # IFD = PPL(a|q)/PPL(a), PPL(a) from HF's own loss on the response alone
        with torch.no_grad():
            la = model(
                input_ids=torch.tensor([pool[k]["response_ids"]]),
                labels=torch.tensor([pool[k]["response_ids"]]),
            ).loss.item()
        assert table[k]["response_loss"] == pytest.approx(la, rel=1e-5)
        assert table[k]["ifd"] == pytest.approx(math.exp(table[k]["loss"] - la), rel=1e-5)


def test_ifd_answer_matched_scores_one_token_answers(tmp_path):
    """features.ifd_answer=matched: s(A) over exactly the tokens s(A|Q) scores, after BOS; a
    one-token answer (the legal pool's Yes/No) has an IFD, where `text` leaves it NaN."""
    model, tok = build_tiny(tied=True)
    pool = make_pool(n=6, seed=3)
    one = pool[1]  # a one-token answer: nothing to score in the answer alone without BOS
    p = one["labels"].count(-100)
    one["input_ids"], one["labels"], one["response_ids"] = (
        one["input_ids"][: p + 1], one["labels"][: p + 1], one["response_ids"][:1],
    )  # fmt: skip
    text = run_features(CFG, model, tok, pool, tmp_path / "text")
    cfg = {**CFG, "features": {**CFG["features"], "ifd_answer": "matched"}}
    matched = run_features(cfg, model, tok, pool, tmp_path / "matched")
    t_rows = pq.read_table(tmp_path / "text" / "features.parquet").to_pylist()
    m_rows = pq.read_table(tmp_path / "matched" / "features.parquet").to_pylist()
    assert math.isnan(t_rows[1]["ifd"]) and math.isfinite(m_rows[1]["ifd"])
    assert text["columns"] == matched["columns"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for k in (0, 1):  # s(A) = HF's loss on [BOS] + the scored answer tokens
        scored = [t for t, y in zip(pool[k]["input_ids"][1:], pool[k]["labels"][1:]) if y != -100]
        ids = torch.tensor([[bos, *scored]])
        with torch.no_grad():
            la = model(input_ids=ids, labels=torch.tensor([[-100, *scored]])).loss.item()
        assert m_rows[k]["response_loss"] == pytest.approx(la, rel=1e-5)
        assert m_rows[k]["loss"] == pytest.approx(t_rows[k]["loss"], rel=1e-6)  # s(A|Q) unchanged
    with pytest.raises(ValueError, match="ifd_answer"):
        run_features(
            {**CFG, "features": {**CFG["features"], "ifd_answer": "bos"}},
            model,
            tok,
            pool,
            tmp_path / "x",
        )


# ~8 s on an idle 2-core machine, ~25 s when it is shared: the acceptance test of sharding
def test_two_processes_match_single(tmp_path):
    pool = make_pool(n=13, seed=1)
    cfg = {**CFG, "features": {**CFG["features"], "padding_side": "left"}}
    single = run_features_from_config(cfg, pool, tmp_path / "one")
    run_distributed(
        "grads.features.compute:run_features_from_config", 2, cfg, pool, str(tmp_path / "two")
    )
    one = pq.read_table(tmp_path / "one" / "features.parquet").to_pylist()
    two = pq.read_table(tmp_path / "two" / "features.parquet").to_pylist()
    assert [r["id"] for r in one] == [r["id"] for r in two] == [s["id"] for s in pool]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for c in a:
            if c == "id":
                continue
            # within 1e-5 (absolute or relative): batches differ in padding length, so float32
            # rounding differs; std of near-constant per-token values is only absolutely close.
            assert a[c] == pytest.approx(b[c], rel=1e-5, abs=1e-5, nan_ok=True), (a["id"], c)
    summary2 = read_json(tmp_path / "two" / "features.json")
    assert summary2["world_size"] == 2 and summary2["n_samples"] == single["n_samples"]
    assert summary2["tokens_processed"] == single["tokens_processed"]
