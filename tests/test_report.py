"""The sweep collector: tolerant of failed jobs, paper layout, mean ± std, rebuild from CSV."""

from __future__ import annotations

import json

import pandas as pd

from grads.report import collect, main, paper_tables


def _job(root, name, domain, selector, budget, seed, dacc, gacc, failed=False):
    job = root / name
    job.mkdir(parents=True)
    (job / "config_resolved.yaml").write_text("seed: 0\n")
    if failed:
        return
    m = {
        "domain": domain,
        "selector": selector,
        "budget": budget,
        "model": "tiny",
        "seed": seed,
        "trainer_mode": "lora",
        "domain_acc": dacc,
        "general_acc": gacc,
        "domain_gain": dacc - 0.30,
        "forgetting": 0.50 - gacc,
        "n_selected": 5,
        "n_pool": 100,
        "selection_cost_s": 12.0,
        "wall_s": 30.0,
        "cost": {"finetune": {"wall_s": 7.0, "tokens": 1000}},
        "tasks": {"grads_synthetic": {"acc": dacc, "acc_stderr": 0.01}},
    }
    (job / "metrics.json").write_text(json.dumps(m))


def test_collect_tables_and_rebuild_from_csv(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, "0", "synthetic", "random", "p5", 0, 0.40, 0.48)
    _job(sweep, "1", "synthetic", "random", "p5", 1, 0.44, 0.46)
    _job(sweep, "2", "synthetic", "grads", "p5", 0, 0.50, 0.49)
    _job(sweep, "3", "synthetic", "full", "p5", 0, 0.60, 0.40)
    _job(sweep, "4", "synthetic", "grads", "p50", 0, 0.55, 0.45)
    _job(sweep, "5", "synthetic", "grads", "p50", 1, 0.0, 0.0, failed=True)
    rows, missing = collect(sweep)
    assert len(rows) == 5 and len(missing) == 1 and missing[0].endswith("5")
    wide = paper_tables(pd.DataFrame(rows))["synthetic"]
    assert list(wide.index[:3]) == ["full", "random", "grads"]
    # random at p5 over seeds 0 and 1: mean 42.0, sample std 2.8
    assert wide.loc["random", ("p5", "Domain acc")] == "42.0 ± 2.8"
    assert wide.loc["grads", ("p5", "Forgetting")] == "1.0"
    assert wide.loc["random", ("p50", "Domain acc")] == "–"

    main([str(sweep), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "missing or failed job" in out and "| random |" in out
    for f in (
        "results.csv",
        "results.md",
        "results.tex",
        "gain_vs_forgetting_synthetic.png",
        "acc_vs_budget_synthetic.png",
    ):
        assert (tmp_path / "rep" / f).exists(), f
    first = (tmp_path / "rep" / "results.md").read_text()
    main(["--from-csv", str(tmp_path / "rep" / "results.csv"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "results.md").read_text() == first
