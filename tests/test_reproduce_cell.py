"""Re-running a committed cell (``scripts/reproduce_cell.py``, :mod:`grads.paper.reproduce`): the
overrides of a cell, the committed-cell lookup and the verdict (inside / outside the committed CI);
the re-run itself is the pipeline's, tested elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grads.paper import reproduce as rc
from tests.test_report import _items, _paired_sweep


def test_cell_overrides_name_table1_and_table2_cells():
    assert rc.cell_overrides("legal", "less", "p50", 1) == [
        "experiment=paper_main", "selector=less", "domain=legal", "budget=p50", "seed=1"
    ]  # fmt: skip
    ov = rc.cell_overrides("medical", "grads.stratified.embed+lm_head", "p5", 0)
    assert ov[:4] == [
        "experiment=paper_ablation", "selector=grads", "selector.rule=stratified",
        "selector.layers=[embed,lm_head]",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="neither a selector"):
        rc.cell_overrides("medical", "grads_typo", "p5", 0)


def test_table2_cell_keys_match_the_ablation_sweep(data_dir):
    """The overrides of a Table 2 cell give the keys the paper_ablation sweep gave it."""
    from tests.test_key_stability import CASES, FIXTURE

    pinned = json.loads(FIXTURE.read_text())["ablation_med_density_embed"]
    assert CASES["ablation_med_density_embed"][-1] == "selector.layers=[embed]"
    keys = rc.stage_keys(rc.cell_overrides("medical", "grads.density.embed", "p5", 0))
    assert keys == {s: pinned[s] for s in keys}


def test_committed_lookup_and_verdict(tmp_path, capsys):
    from grads.paper.tables import main as report_main

    _paired_sweep(tmp_path / "sweep")  # medical: random and grads, seeds 0-2, per-item results
    report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "rep"), "--title", "medical"])
    capsys.readouterr()
    csv = tmp_path / "rep" / "medical.csv"
    old, ref = rc.committed(csv, "grads", "p5", 1, "random")
    with pytest.raises(SystemExit, match="no committed run of less"):
        rc.committed(csv, "less", "p5", 0, "random")
    same = rc.compare(old, old, ref)  # a bit-identical re-run
    assert {r["metric"] for r in same} >= {"domain_bpb", "general_kl"}
    assert all(r["inside"] for r in same)
    worse = {"tuned": _items(np.random.default_rng(5), 80, nll_shift=0.5, kl=0.09)}
    verdict = {r["metric"]: r["inside"] for r in rc.compare(worse, old, ref)}
    assert verdict["domain_bpb"] is False


def test_selection_overlap_counts_the_committed_ids_selected_again(tmp_path):
    from types import SimpleNamespace

    from grads.io import write_jsonl
    from grads.paper.reproduce import selection_overlap

    sel_dir, select = tmp_path / "selections", tmp_path / "select"
    write_jsonl(sel_dir / "grads_paper_p5_seed0.jsonl", [{"id": i} for i in "abcd"])
    write_jsonl(select / "selection.jsonl", [{"id": i} for i in "abxy"])
    args = SimpleNamespace(method="grads_paper", budget="p5", seed=0)
    metrics = {"artefacts": {"select": str(select)}}
    assert selection_overlap(metrics, sel_dir, args) == (2, 4)
    assert selection_overlap({"artefacts": {}}, sel_dir, args) is None
