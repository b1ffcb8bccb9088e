"""The pool-scale experiment's plan (grads.paper.poolscale) and its views, without training."""

from __future__ import annotations

import pytest

from grads.io import write_json, write_jsonl
from grads.paper import poolscale
from grads.paper.poolscale_views import curve_figure, overlap, pool_size_table, stability_report


def _jobs(phase: str) -> list[list[str]]:
    """The job overrides of a phase's sweep, split as Hydra's basic sweeper splits them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ov = OverridesParser.create().parse_overrides(poolscale.phase_overrides(phase, "less"))
    return BasicSweeper.split_arguments(ov, max_batch_size=None)[0]


def test_every_phase_uses_the_whole_pool_in_bf16_except_the_references():
    counts = {p: len(_jobs(p)) for p in poolscale.expand(poolscale.PHASES)}
    assert counts == {"features": 1, "main_p5": 4, "full": 1, "seeds_p5": 6, "curve": 6,
                      "bridge": 2, "stability_whole": 3, "stability_1k": 3}  # fmt: skip
    for phase in counts:
        ov = poolscale.phase_overrides(phase, "less")
        assert "experiment=paper_main" in ov and "domain=financial" in ov
        if phase == "stability_1k":  # the committed 1,000-pool tables ran in float32
            assert "trainer.autocast=true" not in ov and not any("pool_limit" in o for o in ov)
        else:
            assert "trainer.autocast=true" in ov
            limit = "domain.pool_limit=1000" if phase == "bridge" else "domain.pool_limit=null"
            assert limit in ov


@pytest.mark.parametrize("phase", ["main_p5", "curve", "stability_whole"])
def test_phase_jobs_compose_and_share_the_warmup_and_features(phase):
    """Every job of a phase composes and validates; the whole-pool jobs share one warm-up and
    one features entry with the features phase (the cache computes them once)."""
    from grads.config import compose_resolved
    from grads.pipeline import job_identities

    def keys(overrides):
        ids = job_identities(compose_resolved(list(overrides)))
        return ids["warmup"].key, ids["features"].key

    shared = keys(_jobs("features")[0])
    seed1 = set()
    for job in _jobs(phase):
        cfg = compose_resolved(list(job))
        assert cfg["domain"]["pool_limit"] is None and cfg["trainer"]["autocast"] is True
        if phase == "stability_whole":  # its own warm-up; one features entry: LESS's pass, no IFD
            assert cfg["warmup"]["seed"] == 1 and keys(job)[0] != shared[0]
            assert cfg["features"]["representations"] == ["lora_grads"]
            assert cfg["features"]["ifd"] is False
            seed1.add(keys(job))
        else:
            assert keys(job) == shared
    assert len(seed1) == (phase == "stability_whole")


def test_curve_budget_p1_exists():
    from grads.config import compose_resolved

    assert compose_resolved(["budget=p1"])["budget"]["value"] == 0.01


def test_overlap_counts_shared_samples_and_chance():
    o = overlap({"a", "b", "c", "d"}, {"c", "d", "e", "f"}, n_pool=40)
    assert o == {"k": 4, "shared": 2, "fraction": 0.5, "chance": 0.1}


def _job(folder, selector, ids, n_pool=100):
    sel_dir = folder / "cache_select"
    write_jsonl(sel_dir / "selection.jsonl", [{"id": i, "rank": k} for k, i in enumerate(ids)])
    write_json(folder / "metrics.json", {"selector": selector, "n_pool": n_pool,
                                         "artefacts": {"select": str(sel_dir)}})  # fmt: skip


def test_stability_report_pairs_each_selector_with_its_seed0_subset(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    _job(runs / "main_p5" / "grads_p5_seed0", "grads", ["a", "b", "c", "d"])
    _job(runs / "stability_whole" / "grads_p5_seed0", "grads", ["a", "b", "x", "y"])
    write_jsonl(tmp_path / "selections" / "less_p5_seed0.jsonl",
                [{"id": i} for i in "pqrs"])  # fmt: skip
    _job(runs / "stability_1k" / "less_p5_seed0", "less", ["p", "q", "r", "z"], n_pool=1000)
    out = stability_report(runs, results, tmp_path / "selections")
    assert out["stability_whole"]["grads"]["shared"] == 2
    assert out["stability_1k"]["less"] == {"k": 4, "shared": 3, "fraction": 0.75, "chance": 0.004}
    md = (results / "financial_pool" / "stability.md").read_text()
    assert "| whole | grads | 2 of 4 | 0.50 | 0.040 |" in md


def _rows():
    rows = []
    for sel, budgets in {"random": ["p1", "p5"], "grads": ["p1", "p5"], "full": ["p5"]}.items():
        for b in budgets:
            rows.append({"selector": sel, "budget": b, "domain": "financial", "seed": 0,
                         "domain_bpb": 0.8, "general_kl": 0.01, "base_domain_bpb": 1.0,
                         "base_general_kl": 0.0, "n_pool": 10617, "items": None})  # fmt: skip
    return rows


def test_curve_figure_and_pool_table_without_items(tmp_path):
    """Without per-item results the figure still draws the absolute values, and the table marks
    every paired cell as missing instead of inventing one."""
    png = curve_figure(_rows(), tmp_path / "curve.png")
    assert png.is_file() and png.stat().st_size > 10_000
    md = pool_size_table({"1,000": _rows(), "whole": _rows()})
    assert md.startswith("| method | metric | 1,000 | whole |") and "▲" not in md


def test_overrides_may_follow_the_phases(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(
        poolscale, "run", lambda phases, r, res, dry, ov: seen.update(p=phases, o=ov)
    )
    poolscale.main(
        ["--phases", "features", "features.chunk_size=1024", "--runs-dir", str(tmp_path)]
    )
    assert seen == {"p": ["features"], "o": ["features.chunk_size=1024"]}
    with pytest.raises(SystemExit):
        poolscale.main(["--phases", "featurse"])


def test_pool_size_report_sets_the_whole_pool_beside_the_1000_pool(tmp_path):
    """The report reads the collected CSVs alone. With the bridge's runs standing in for the whole
    pool, its two bf16 columns agree cell for cell and the float32 column is Table 1's 3 seeds."""
    import shutil

    from grads.paper.poolscale_views import pool_size_report
    from tests.conftest import REPO

    res = REPO / "results"
    shutil.copytree(res / "tables" / "financial", tmp_path / "tables" / "financial")
    bridge = tmp_path / "poolscale" / "financial_bridge"
    shutil.copytree(res / "poolscale" / "financial_bridge", bridge)
    assert pool_size_report(tmp_path) is None  # no whole-pool rows yet: nothing written
    whole = tmp_path / "poolscale" / "financial_pool"
    whole.mkdir()
    for name in ("financial_bridge.csv", "financial_bridge_items.json.gz"):
        shutil.copy(bridge / name, whole / name.replace("financial_bridge", "financial_pool"))
    md, compute = pool_size_report(tmp_path).read_text().split("## compute")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3:-1]
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}  # fmt: skip
    for key in [
        ("random", "held-out bpb"),
        ("grads", "held-out bpb"),
        ("grads", "KL(base ‖ tuned)"),
    ]:
        t1k, bridge_cell, whole_cell = (c.strip() for c in rows[key])
        assert bridge_cell == whole_cell and "(1 seed)" in whole_cell
        assert "(3 seeds)" in t1k
    assert rows[("pool / subset", "samples")][2].strip() == "1,000 / 50"
    # only the whole pool's methods: Table 1's other selectors stay out
    assert {k[0] for k in rows} == {"method", "base model", "random", "grads", "pool / subset"}
    # the copied bridge rows read as the bridge (pool of 1,000) in both columns of the compute
    assert "| bridge | 4 |" in compute and "| warmup | bridge |" in compute


def test_collect_links_the_collections_from_results_md(tmp_path):
    import shutil

    from tests.conftest import REPO

    results_root = tmp_path / "results" / "poolscale"
    shutil.copytree(REPO / "results" / "poolscale" / "financial_bridge",
                    results_root / "financial_bridge")  # fmt: skip
    md = tmp_path / "RESULTS.md"
    md.write_text("x\n<!-- tables:financial_bridge:begin -->\nold\n"
                  "<!-- tables:financial_bridge:end -->\ny\n")  # fmt: skip
    poolscale.collect(tmp_path / "runs", results_root, results_md=md)
    text = md.read_text()
    assert "old" not in text and text.startswith("x\n") and text.endswith("y\n")
    assert "[financial_bridge.md](results/poolscale/financial_bridge/financial_bridge.md)" in text


def test_status_names_every_job_of_the_sweeps_and_its_state(tmp_path, capsys):
    for phase in poolscale.expand(poolscale.PHASES):  # one folder per job the sweeper launches
        names = poolscale.job_names(phase, "less")
        assert len(names) == len(set(names)) == len(_jobs(phase))
    runs = tmp_path / "runs"
    write_json(runs / "main_p5" / "random_p5_seed0" / "metrics.json",
               {"cost": {"warmup": {"wall_s": 600.0, "cached": True},
                         "select": {"wall_s": 6.0, "cached": False},
                         "finetune": {"wall_s": 60.0, "cached": True},  # a rerun read it back
                         "evaluate": {"wall_s": 30.0, "cached": False}}})  # fmt: skip
    (runs / "main_p5" / "grads_p5_seed0").mkdir(parents=True)
    rows = {(r["phase"], r["job"]): r for r in poolscale.status(runs, "less", ["main_p5"])}
    assert rows["main_p5", "random_p5_seed0"] == {"phase": "main_p5", "job": "random_p5_seed0",
                                                  "state": "done", "computed_min": 1.6}  # fmt: skip
    assert rows["main_p5", "grads_p5_seed0"]["state"] == "started"
    assert rows["main_p5", "less_p5_seed0"]["state"] == "pending"
    poolscale.print_status(list(rows.values()))
    assert "done: main_p5 1/4 (0.0 h)" in capsys.readouterr().out


def test_pool_features_come_from_the_collections_own_sweep(tmp_path):
    """The bridge's pool_features.csv is its own 1,000-sample pool's, not main_p5's whole pool."""
    import pandas as pd

    from grads.paper.publish import publish_pool_features

    runs = tmp_path / "runs"
    for sweep, ids in {"main_p5": ["w1", "w2", "w3"], "bridge": ["b1"]}.items():
        feats = tmp_path / f"features_{sweep}"
        feats.mkdir()
        pd.DataFrame({"id": ids, "loss": 0.1, "n_tokens": 1, "embed": 1.0,
                      "lm_head": 2.0}).to_parquet(feats / "features.parquet")  # fmt: skip
        write_json(runs / sweep / "random_p5_seed0" / "metrics.json",
                   {"artefacts": {"features": str(feats)}})  # fmt: skip
    out = tmp_path / "pool_features.csv"
    assert publish_pool_features(runs, out, {"b1": "fpb"}, "bridge")
    assert pd.read_csv(out)["id"].tolist() == ["b1"]
    assert not publish_pool_features(runs, out, {}, "curve")


def test_the_curve_runs_one_budget_at_a_time_so_its_pairs_land_together(tmp_path):
    """Within one sweep the sweeper is selector-major; one sweep per budget pairs the cells."""
    curve = poolscale.commands("curve", "less", tmp_path)
    assert [[o for o in c if o.startswith(("budget=", "selector="))] for c in curve] == [
        [f"budget={b}", "selector=random,grads"] for b in poolscale.CURVE_BUDGETS
    ]
    assert all(f"hydra.sweep.dir={tmp_path / 'curve'}" in c for c in curve)
    assert len(poolscale.commands("full", "less", tmp_path, ["x=1"])) == 1


def test_compute_table_sums_each_phases_cells_and_counts_shared_stages_once():
    from grads.paper.poolscale_views import compute_table

    def row(sel, budget, seed, n_pool=10_617, ft=1800.0):
        return {"selector": sel, "budget": budget, "seed": seed, "n_pool": n_pool,
                "finetune_s": ft, "evaluate_s": 360.0, "warmup_s": 7200.0, "features_s": 3600.0}  # fmt: skip

    rows = [row("random", "p5", 0), row("grads", "p5", 0), row("grads", "p5", 1),
            row("full", "p5", 0, ft=18000.0), row("grads", "p1", 0), row("random", "p5", 0, 1000)]  # fmt: skip
    text = compute_table(rows)
    assert "| main_p5 | 2 | 1.0 | 0.2 |" in text and "| seeds_p5 | 1 | 0.5 | 0.1 |" in text
    assert "| full | 1 | 5.0 | 0.1 |" in text and "| curve | 1 | 0.5 | 0.1 |" in text
    assert "| bridge | 1 | 0.5 | 0.1 |" in text
    assert "| warmup | whole pool | 2.0 |" in text and "| features | bridge | 1.0 |" in text
