"""Held-out domain split: deterministic by content, whole key groups, disjoint from every pool."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from grads.data import heldout
from grads.data.pool import load_records
from grads.data.records import Record, sample_id
from tests.conftest import compose


def _domain(tmp_path, rows, n=5, **extra) -> dict:
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "name": "toy",
        "sources": [
            {
                "name": "toy",
                "path": str(src),
                "prompt": "{q}",
                "response": "{a}",
                "key_field": "q",
            }
        ],
        "heldout": {"n": n},
        **extra,
    }


ROWS = [{"q": f"Question number {i}?", "a": f"Answer {i}."} for i in range(60)]


def test_choice_is_by_content_not_by_order(tmp_path):
    dom = _domain(tmp_path, ROWS)
    first = {r.id for r in heldout.split(heldout.candidates(dom), dom)[1]}
    dom_rev = _domain(tmp_path, ROWS[::-1])
    again = {r.id for r in heldout.split(heldout.candidates(dom_rev), dom_rev)[1]}
    assert len(first) == 5 and first == again
    # a different salt draws a different split; a larger n extends the same hash order
    dom["heldout"] = {"n": 5, "salt": "other"}
    assert {r.id for r in heldout.split(heldout.candidates(dom), dom)[1]} != first
    dom["heldout"] = {"n": 9}
    assert first < {r.id for r in heldout.split(heldout.candidates(dom), dom)[1]}


def test_key_groups_stay_together(tmp_path):
    # the same question with several answers (as in MedQuAD) must land on one side
    rows = [{"q": f"Q{i // 3}?", "a": f"answer {i}"} for i in range(30)]
    dom = _domain(tmp_path, rows, n=4)
    pool, held = heldout.split(heldout.candidates(dom), dom)
    held_keys = {heldout.key_of(r) for r in held}
    assert len(held) == 6  # two whole groups of 3: the second group crosses n=4
    assert held_keys.isdisjoint({heldout.key_of(r) for r in pool})


def test_choose_keys_counts_duplicates_once():
    recs = [Record(sample_id("p", "r"), "s", "p", "r")] * 3
    recs += [Record(sample_id(f"p{i}", "r"), "s", f"p{i}", "r") for i in range(5)]
    assert len(heldout.choose_keys(recs, 2)) == 2


@pytest.mark.parametrize("pool_limit", [None, 10, 25, 54])
@pytest.mark.parametrize("pool_seed", [0, 1, 7])
def test_heldout_never_in_a_pool_toy(tmp_path, pool_limit, pool_seed):
    dom = _domain(tmp_path, ROWS, pool_limit=pool_limit, pool_seed=pool_seed)
    held = {r.id for r in heldout.heldout_records({"domain": dom})}
    for dedup in (True, False):
        recs, stats = load_records(dom, {"dedup": dedup})
        assert held.isdisjoint(r.id for r in recs)
        assert stats["heldout_for_domain_loss"] == 5
    recs, _ = load_records({**dom, "pool_limit": None}, {})
    assert {r.id for r in recs} | held == {r.id for r in heldout.candidates(dom)}


@pytest.mark.parametrize("domain", ["medical", "legal", "financial"])
def test_heldout_never_in_a_real_pool(domain, tmp_path):
    """The acceptance test: several pool_limit / pool_seed values, every real domain."""
    cfg = OmegaConf.to_container(
        compose([f"domain={domain}", f"paths.cache_dir={tmp_path}"]), resolve=True
    )
    held = heldout.heldout_records(cfg)
    assert 300 <= len(held) <= 310
    keys = {heldout.key_of(r) for r in held}
    ids = {r.id for r in held}
    full, _ = load_records(cfg["domain"], cfg["data"])
    assert keys.isdisjoint(heldout.key_of(r) for r in full)
    for limit, seed in [(1000, 0), (1000, 1), (400, 3), (5000, 0)]:
        pool, _ = load_records(
            {**cfg["domain"], "pool_limit": limit, "pool_seed": seed}, cfg["data"]
        )
        assert len(pool) == limit
        assert ids.isdisjoint(r.id for r in pool)
        assert keys.isdisjoint(heldout.key_of(r) for r in pool)
    # materialise() writes the same split, and reuses the file
    path = heldout.materialise(cfg)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [w["id"] for w in written] == [r.id for r in held]
    assert heldout.materialise(cfg) == path


def test_synthetic_uses_held_out_phrasings(tmp_path):
    cfg = OmegaConf.to_container(
        compose(["domain=synthetic", f"paths.cache_dir={tmp_path}"]), resolve=True
    )
    held = heldout.heldout_records(cfg)  # materialises the generator's files
    pool, _ = load_records(cfg["domain"], cfg["data"])
    assert len(held) == 200 and len(pool) == 465  # nothing removed from the pool
    prompts = {r.prompt for r in pool}
    assert all(r.prompt not in prompts for r in held)
    assert held[0].source == "synthetic_heldout"


def test_bad_heldout_config_is_named(tmp_path):
    dom = _domain(tmp_path, ROWS, n=0)
    with pytest.raises(heldout.HeldoutConfigError, match="heldout.n"):
        load_records(dom, {})
    dom = _domain(tmp_path, ROWS)
    del dom["heldout"]
    with pytest.raises(heldout.HeldoutConfigError, match="no `heldout` block"):
        heldout.heldout_records({"domain": dom})
