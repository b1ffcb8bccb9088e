"""select.balance: per-class quotas over any selector's ranking (grads.selectors.balance)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra.utils import instantiate

from grads.features.store import Representation
from grads.selectors.balance import (
    MAX_ANSWER_CLASSES,
    answer_shares,
    balanced_select,
    check_balanceable,
    group_labels,
    method_name,
    quotas,
    ranking,
    warn_if_skewed,
)
from grads.selectors.base import traits
from grads.selectors.budget import Budget, parse_budget
from grads.selectors.loss import LossSelector
from tests.test_pipeline import TINY, _run
from tests.test_selectors import SELECTORS, configs, make_table, run  # noqa: F401 (fixture)


def _reps(sel, table) -> dict | None:
    """Random representations (and a target set) for the selectors that read them."""
    names = traits(sel).representations
    if not names:
        return None
    rng = np.random.default_rng(len(table))
    ids = np.array(sorted(table["id"]), dtype=object)
    target = rng.normal(size=(3, 8)).astype(np.float32)
    pool = rng.normal(size=(ids.size, 8)).astype(np.float32)
    tids, groups = (
        np.array(["t0", "t1", "t2"], dtype=object),
        np.array(["a", "a", "b"], dtype=object),
    )
    return {n: Representation(n, ids, pool, tids, target, groups) for n in names}


def _labels(table, share_a: float = 0.3, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {i: ("A" if rng.random() < share_a else "B") for i in table["id"]}


def test_quotas_split_the_budget_in_proportion_and_sum_exactly():
    assert quotas({"Yes": 477, "No": 523}, 50) == {"Yes": 24, "No": 26}
    assert quotas({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # ties: by name
    assert quotas({"a": 10, "b": 30}, 40) == {"a": 10, "b": 30}
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = {f"g{i}": int(c) for i, c in enumerate(rng.integers(1, 50, rng.integers(1, 6)))}
        k = int(rng.integers(0, sum(counts.values()) + 1))
        q = quotas(counts, k)
        assert sum(q.values()) == k
        assert all(0 <= q[g] <= counts[g] for g in counts)
        n = sum(counts.values())
        assert all(abs(q[g] - k * counts[g] / n) < 1 for g in counts)
    with pytest.raises(ValueError, match="cannot keep 5 of 3"):
        quotas({"a": 3}, 5)


def test_a_one_class_ranking_is_cut_to_the_pool_shares():
    """The legal case: the selector's top k is all of one class; balanced keeps the pool's shares,
    each class's best samples in the selector's own order."""
    t = make_table(400, seed=1)
    labels = {
        i: ("Yes" if loss > np.median(t["loss"]) else "No") for i, loss in zip(t["id"], t["loss"])
    }
    sel = LossSelector(name="loss_high")
    plain = sel.select(t, parse_budget("p10"), 0)
    assert {labels[i] for i in plain.ids} == {"Yes"}
    bal = balanced_select(sel, t, parse_budget("p10"), 0, labels, "answer")
    assert len(bal) == 40 and Counter(labels[i] for i in bal.ids) == {"Yes": 20, "No": 20}
    ranking = sel.select(t, Budget("fraction", 1.0), 0).ids
    for cls in ("Yes", "No"):
        assert [i for i in bal.ids if labels[i] == cls] == [i for i in ranking if labels[i] == cls][
            :20
        ]
    assert bal.ids == [i for i in ranking if i in set(bal.ids)]  # the selector's order is kept
    assert np.all(np.diff(bal.scores) <= 0)
    d = bal.diagnostics["balance"]
    assert d == {
        "by": "answer",
        "pool": {"No": 200, "Yes": 200},
        "quotas": {"No": 20, "Yes": 20},
        "unbalanced": {"Yes": 40},
    }
    assert bal.diagnostics["selected"] == 40 and bal.diagnostics["budget"]["name"] == "p10"
    assert len(bal.artifacts["selected_values"]) == 40


def test_every_sized_selector_balances(configs):  # noqa: F811
    sels, _ = configs
    t = make_table(300, seed=2, nan_rows=7)
    labels = _labels(t)
    valid = Counter(labels[i] for i, ok in zip(t["id"], t["loss"].notna()) if ok)
    for name in SELECTORS:
        sel = instantiate(sels[name])
        if name == "full":
            with pytest.raises(ValueError, match="nothing to balance"):
                check_balanceable(sel, parse_budget("p10"))
            continue
        bal = balanced_select(sel, t, parse_budget("p10"), 3, labels, "answer", reps=_reps(sel, t))
        assert len(bal) == run(sel, t, parse_budget("p10"), 3).diagnostics["selected"], name
        ranked = Counter(labels[i] for i in ranking(sel, t, 3, _reps(sel, t)).ids)
        if name != "ifd":  # IFD's filter drops rows: its quotas follow the classes of what it ranks
            assert ranked == valid, name
        expect = quotas(ranked, len(bal))
        assert dict(Counter(labels[i] for i in bal.ids)) == {g: q for g, q in expect.items() if q}
        assert len(set(bal.ids)) == len(bal.ids), name


def test_group_labels_refuse_a_generative_pool_and_name_the_fix():
    recs = [SimpleNamespace(id=f"r{i}", source="s", response=f" answer {i} ") for i in range(30)]
    with pytest.raises(ValueError, match=f"at most {MAX_ANSWER_CLASSES} distinct answers.*has 30"):
        group_labels(recs, "answer")
    assert set(group_labels(recs, "source").values()) == {"s"}
    yes_no = [
        SimpleNamespace(id=f"r{i}", source="s", response=" Yes" if i % 3 else "No\n")
        for i in range(9)
    ]
    assert Counter(group_labels(yes_no, "answer").values()) == {"Yes": 6, "No": 3}
    with pytest.raises(ValueError, match="choose one of"):
        group_labels(recs, "label")


def test_auto_budget_and_method_name():
    with pytest.raises(ValueError, match="budget=auto"):
        check_balanceable(LossSelector(name="loss_high"), parse_budget("auto"))
    cfg = {"selector": {"name": "grads"}, "select": {"balance": "answer"}}
    assert method_name(cfg) == "grads+answer_balanced"
    assert method_name({"selector": {"name": "grads"}, "select": {"balance": None}}) == "grads"
    assert method_name({"selector": {"name": "grads"}}) == "grads"


def _yes_no_pool(tmp_path: Path, n_yes: int = 30, n_no: int = 10) -> str:
    pool = tmp_path / "pool.jsonl"
    rows = [{"q": f"Does clause {i} grant a licence?", "a": "Yes"} for i in range(n_yes)]
    rows += [{"q": f"Does clause {i} cap liability?", "a": "No"} for i in range(n_no)]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"domain.sources=[{{name: mine, path: '{pool}', prompt: '{{q}}', response: '{{a}}'}}]"


def test_balanced_run_end_to_end(tmp_path):
    """Through the pipeline: a 50 % balanced loss_high subset of a 30 Yes / 10 No pool is 15 / 5,
    under its own name, with its own select key (the unbalanced key is unchanged)."""
    src = _yes_no_pool(tmp_path)
    common = ["experiment=smoke", *TINY, "~domain.generator", src, "selector=loss_high",
              "budget=p50", "stages=[warmup,features,select]"]  # fmt: skip
    plain = _run(tmp_path / "plain", [*common, "paths.cache_dir=" + str(tmp_path / "cache")])
    m = _run(tmp_path / "bal", [*common, "paths.cache_dir=" + str(tmp_path / "cache"),
                                "select.balance=answer"])  # fmt: skip
    assert m["selector"] == "loss_high+answer_balanced" and plain["selector"] == "loss_high"
    assert m["keys"]["features"] == plain["keys"]["features"]  # warm-up and features shared
    assert m["keys"]["select"] != plain["keys"]["select"]
    assert m["cache_misses"] == ["select"]
    sel_dir = Path(m["artefacts"]["select"])
    answers = {
        json.loads(line)["id"] for line in (sel_dir / "selection.jsonl").read_text().splitlines()
    }
    summary = json.loads((sel_dir / "selection.json").read_text())
    assert summary["balance"]["quotas"] == {"No": 5, "Yes": 15} and len(answers) == 20
    plain_summary = json.loads((Path(plain["artefacts"]["select"]) / "selection.json").read_text())
    assert "balance" not in plain_summary
    # balanced or not, a label-like pool's subset is reported against the pool's answers
    assert plain_summary["answers"]["pool"] == {"No": 10, "Yes": 30}
    assert sum(plain_summary["answers"]["subset"].values()) == 20
    assert summary["answers"] == {"pool": {"No": 10, "Yes": 30}, "subset": {"No": 5, "Yes": 15},
                                  "total_variation": 0.0}  # fmt: skip


def test_balance_on_a_generative_pool_fails_before_the_warmup(tmp_path):
    with pytest.raises(ValueError, match="label-like pool"):
        _run(tmp_path, ["experiment=smoke", *TINY, "select.balance=answer"])
    assert not list(tmp_path.rglob("warmup"))  # nothing was trained


def test_bad_balance_value_is_a_config_error(tmp_path):
    from grads.config import ConfigError

    with pytest.raises(ConfigError, match="select.balance='label'"):
        _run(tmp_path, ["experiment=smoke", *TINY, "select.balance=label"])


def test_a_skewed_subset_is_reported_and_warned_about(caplog):
    labels = {f"s{i}": ("Yes" if i < 48 else "No") for i in range(100)}
    pool = list(labels)
    one_class = answer_shares(pool[:10], pool, labels)
    assert one_class == {"pool": {"No": 52, "Yes": 48}, "subset": {"Yes": 10},
                         "total_variation": 0.52}  # fmt: skip
    with caplog.at_level("WARNING"):
        assert warn_if_skewed(one_class, "grads")
    assert "'Yes' 100 %" in caplog.text and "select.balance=answer" in caplog.text
    mixed = answer_shares(pool[40:60], pool, labels)  # 8 Yes / 12 No
    assert mixed["total_variation"] == 0.08 and not warn_if_skewed(mixed, "random")
    assert answer_shares([], pool, labels)["total_variation"] == 0.0
