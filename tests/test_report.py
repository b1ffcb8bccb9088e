"""The sweep collector (``grads-report``): tolerant of failed jobs, paper layout, mean ± std,
rebuild from CSV."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from grads.paper.tables import main
from grads.report import collect, paper_tables


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


# ---------------------------------------------------------------------------------------------------
# Paired comparisons and the noise floor
# ---------------------------------------------------------------------------------------------------
def _items(rng, n, nll_shift=0.0, kl=0.05, acc_p=0.5):

    tokens = rng.integers(20, 60, size=n).astype(float)
    nll = tokens * (2.0 + nll_shift + rng.normal(0, 0.05, size=n))
    keys = [f"{i}-abc" for i in range(n)]
    return {
        "domain_loss": {
            "grads_heldout": {
                "keys": keys,
                "nll": nll.tolist(),
                "tokens": tokens.tolist(),
                "bytes": (tokens * 4).tolist(),
            }
        },
        "domain": {"t": {"keys": keys, "acc": (rng.random(n) < acc_p).astype(float).tolist()}},
        "kl": {
            "grads_alpaca_ref": {
                "keys": keys,
                "kl": (tokens * kl).tolist(),
                "tokens": tokens.tolist(),
            }
        },
    }


def _paired_sweep(root):
    import numpy as np

    base_rng = np.random.default_rng(99)
    base = _items(base_rng, 80, nll_shift=0.3)
    base.pop("kl")  # the base model has no KL to itself
    for i, (sel, seed, shift, kl) in enumerate(
        [("random", s, 0.0, 0.05) for s in range(3)] + [("grads", s, -0.2, 0.09) for s in range(3)]
    ):
        tuned = _items(np.random.default_rng(seed * 7 + (sel == "grads")), 80, shift, kl)
        _job(root, str(i), "medical", sel, "p5", seed, 0.4, 0.45)
        m = json.loads((root / str(i) / "metrics.json").read_text())
        m["items"] = {"tuned": tuned, "base": base}
        m["domain_bpb"] = 0.5
        (root / str(i) / "metrics.json").write_text(json.dumps(m))


def _ablation_job(sweep, job_name, selector, **fields):
    """A Table 2 run in ``sweep``: the metrics of job 3 (grads, seed 0) under another name."""
    base = json.loads((sweep / "3" / "metrics.json").read_text())
    job = sweep / job_name
    job.mkdir()
    (job / "config_resolved.yaml").write_text("seed: 0\n")
    (job / "metrics.json").write_text(json.dumps({**base, "selector": selector, **fields}))


def test_paired_tables_mark_significant_wins_and_losses(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _paired_sweep(sweep)
    main([str(sweep), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "paired difference vs random" in out
    grads_row = next(
        line for line in out.splitlines() if line.startswith("| grads |") and "[" in line
    )
    cells = [c.strip() for c in grads_row.split("|")[2:-1]]
    # columns: Domain bpb, KL, Domain acc, General acc (PAIRED_METRICS); lower bpb wins, higher KL loses
    assert cells[0].startswith("-") and cells[0].endswith("▲")
    assert cells[1].startswith("+") and cells[1].endswith("▼")
    assert "ref" in next(
        line for line in out.splitlines() if line.startswith("| random |") and "ref" in line
    )
    tex = (tmp_path / "rep" / "results.tex").read_text()
    assert r"\blacktriangle" in tex and r"\blacktriangledown" in tex
    first = (tmp_path / "rep" / "results.md").read_text()
    forest = (tmp_path / "rep" / "forest_medical.png").read_bytes()  # the paired CIs, drawn
    main(["--from-csv", str(tmp_path / "rep" / "results.csv"), "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "results.md").read_text() == first
    assert (tmp_path / "rep" / "forest_medical.png").read_bytes() == forest
    from grads.report import forest_plot

    assert forest_plot({}, "medical", tmp_path) is None  # nothing paired: no empty figure


def test_full_is_paired_with_random_at_every_budget():
    """``full`` runs once (under the 5 % sweep) but the tables show it at 50 % too: its paired CI
    against random at 50 % is the one a reader needs to say whether random 50 % reaches the pool."""
    import numpy as np

    from grads.report import paired_tables

    def row(sel, budget, shift):
        items = {"tuned": _items(np.random.default_rng(len(sel) + len(budget)), 60, shift)}
        return {"domain": "medical", "model": "m", "trainer_mode": "lora", "budget": budget,
                "selector": sel, "seed": 0, "items": items}  # fmt: skip

    rows = [row("random", "p5", 0.0), row("random", "p50", -0.1), row("full", "p5", -0.3)]
    raw: dict = {}
    table = paired_tables(rows, "random", ["domain_bpb"], n_boot=200, raw=raw)["medical"]
    p5, p50 = (
        raw[("medical", "p5", "full", "domain_bpb")],
        raw[("medical", "p50", "full", "domain_bpb")],
    )
    assert p5.hi < 0 and p50.hi < 0  # lower bpb than random at both budgets
    assert p50.mean > p5.mean  # random 50 % is closer to the pool than random 5 %
    assert all(c.endswith("▲") for c in table.loc["full"])
    # without a reference at a budget there is nothing to pair with
    one = paired_tables(rows[:1] + rows[2:], "random", ["domain_bpb"], n_boot=200)["medical"]
    assert list(one.columns.get_level_values(0)) == ["p5"]


def test_paired_bootstrap_exact_cases():
    import numpy as np

    from grads.evaluation.stats import paired_bootstrap

    keys = [str(i) for i in range(50)]
    rng = np.random.default_rng(0)
    acc = (rng.random(50) < 0.5).astype(float)
    b = {"t": {"keys": keys, "acc": acc.tolist()}}
    same = paired_bootstrap([b], [b], "domain_acc")
    assert same.mean == same.lo == same.hi == 0.0 and not same.significant
    # one extra correct item out of 50: +2 points, CI from the single discordant item
    a = {"t": {"keys": keys, "acc": acc.tolist()}}
    flip = int(np.argmin(acc))
    a["t"]["acc"][flip] = 1.0
    p = paired_bootstrap([a], [b], "domain_acc")
    assert p.mean == pytest.approx(0.02) and p.lo >= 0.0 and p.n_items == 50
    # items are aligned by key, not by position
    shuffled = {"t": {"keys": keys[::-1], "acc": a["t"]["acc"][::-1]}}
    assert paired_bootstrap([shuffled], [b], "domain_acc").mean == pytest.approx(0.02)


def test_noise_floor_numbers():
    import math

    import numpy as np

    from grads.evaluation.stats import Z_80, Z_975, noise_floor

    keys = [str(i) for i in range(40)]
    tokens = np.full(40, 10.0)
    base_nll = 10.0 * (2.0 + np.random.default_rng(1).normal(0, 0.1, 40))

    def run(offset):
        nll = base_nll - 10.0 * (0.1 + offset)  # every item moves by the same per-token amount
        return {"h": {"keys": keys, "nll": nll.tolist(), "tokens": tokens.tolist()}}

    offsets = [0.0, 0.01, -0.02]
    nf = noise_floor([run(o) for o in offsets], run(-0.1), "domain_loss", k_compare=3)
    sd = float(np.std([0.1 + o for o in offsets], ddof=1))
    assert nf["effect"] == pytest.approx(-(0.1 + np.mean(offsets)))
    assert nf["improvement"] == pytest.approx(-nf["effect"])
    assert nf["sd_seed"] == pytest.approx(sd)
    assert nf["se_items_pair"] == pytest.approx(0.0, abs=1e-12)  # seeds differ by a constant
    assert nf["mdd"] == pytest.approx((Z_975 + Z_80) * math.sqrt(2 * sd**2 / 3))
    assert nf["ratio"] == pytest.approx(abs(nf["effect"]) / nf["mdd"])


def test_noise_floor_report_picks_headlines(tmp_path):
    from grads.report import collect, noise_floor_report

    _paired_sweep(tmp_path / "sweep")
    rows, _ = collect(tmp_path / "sweep", keep_items=True)
    with pytest.raises(ValueError, match="one method"):
        noise_floor_report(rows)
    text, table = noise_floor_report([r for r in rows if r["selector"] == "random"])
    assert set(table["metrics"]) >= {"domain_loss", "domain_bpb", "domain_acc", "general_kl"}
    # the tuned loss is 0.3 nats/token below the base in every item: by far the clearest domain metric
    assert table["headline"]["domain"] in ("domain_loss", "domain_bpb")
    assert table["metrics"]["domain_loss"]["improvement"] == pytest.approx(0.3, abs=0.02)
    assert table["headline"]["forgetting"] == "general_kl"
    assert "**(headline)**" in text and "| domain_acc |" in text


def test_per_domain_csvs_merge_with_their_paired_items(tmp_path, capsys):
    """Two sweeps with the same job names (one per domain) merge without mixing their items."""
    for domain in ("medical", "legal"):
        sweep = tmp_path / domain
        _paired_sweep(sweep)  # jobs "0".."5" in both
        for m_file in sweep.rglob("metrics.json"):
            m = json.loads(m_file.read_text())
            m["domain"] = domain
            m_file.write_text(json.dumps(m))
        main([str(sweep), "--out", str(tmp_path / "csv"), "--title", domain])
    capsys.readouterr()
    csvs = [str(tmp_path / "csv" / f"{d}.csv") for d in ("medical", "legal")]
    main(["--from-csv", *csvs, "--out", str(tmp_path / "all"), "--title", "tables"])
    md = (tmp_path / "all" / "tables.md").read_text()
    # both domains have their own table and paired table, each with a significant bpb win for grads
    for domain in ("medical", "legal"):
        assert f"## {domain}\n" in md and f"## {domain}: paired difference vs random" in md
    assert md.count("▲") >= 2
    again = tmp_path / "again"
    main(["--from-csv", *csvs, "--out", str(again), "--title", "tables"])
    assert (again / "tables.md").read_text() == md


def test_ablation_grid_and_methods_filter(tmp_path, capsys):
    """grads.<rule>.<source> runs become a rule x source grid; --methods keeps Table 1 to its rows."""
    sweep = tmp_path / "sweep"
    _paired_sweep(sweep)
    for i, (rule, source) in enumerate(
        [("density", "embed"), ("density", "lm_head"), ("magnitude", "embed+lm_head")]
    ):
        _ablation_job(sweep, f"abl{i}", f"grads.{rule}.{source}")
    main([str(sweep), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "results.md").read_text()
    grid = md.split("ablation, Domain bpb vs random")[1].split("\n## ")[0]
    header = next(line for line in grid.splitlines() if line.startswith("| method"))
    assert header.index("embed |") < header.index("lm_head") < header.index("embed+lm_head")
    density = next(line for line in grid.splitlines() if line.startswith("| density |"))
    cells = [c.strip() for c in density.split("|")[2:-1]]
    assert cells[0].endswith("▲") and cells[1].endswith("▲") and cells[2] == "–"
    assert "| magnitude |" in grid
    capsys.readouterr()
    csv = str(tmp_path / "rep" / "results.csv")
    main(["--from-csv", csv, "--out", str(tmp_path / "t1"), "--methods", "random", "grads"])
    t1 = (tmp_path / "t1" / "results.md").read_text()
    assert "grads.density" not in t1 and "ablation" not in t1 and "| grads |" in t1
    with pytest.raises(SystemExit, match="no runs of"):
        main(["--from-csv", csv, "--out", str(tmp_path / "t2"), "--methods", "nope"])


def test_cost_model_takes_the_median_over_runs_of_the_computing_jobs():
    from grads.paper.protocol import CHEAP_VARIANTS
    from grads.report import cost_model

    def row(sel, budget, ft, cached_up=True, ft_cached=False):
        return {
            "domain": "legal",
            "selector": sel,
            "budget": budget,
            "warmup_s": 600.0,
            "warmup_cached": cached_up,
            "features_s": 420.0,
            "features_cached": cached_up,
            "features_gradnorm_s": 240.0,
            "features_ifd_s": 60.0,
            "finetune_s": ft,
            "finetune_cached": ft_cached,
            "evaluate_s": 120.0,
            "evaluate_cached": False,
        }

    df = pd.DataFrame(
        [
            row("random", "p5", 60.0, cached_up=False),
            row("grads", "p5", 120.0),
            row(
                "grads", "p5", 999.0, ft_cached=True
            ),  # the same run again: its computed row counts
            row("grads", "p50", 600.0),
            row("random", "p50", 600.0, ft_cached=True),  # computed by an earlier sweep: counts
            row("less", "p50", 1800.0),  # one job shared the machine: the median ignores it
            row("full", "p5", 1800.0),
            # a cheap variant computes its own (short) warm-up and features first: left out
            {**row("grads_w5", "p5", 60.0, cached_up=False), "warmup_s": 30.0, "features_s": 1.0},
        ]
    )
    m = cost_model(df.iloc[::-1], exclude=CHEAP_VARIANTS).iloc[0]
    assert m["warm-up"] == 10.0 and m["grad-norm pass"] == 4.0 and m["IFD pass"] == 1.0
    assert m["baseline passes"] == 2.0
    assert m["fine-tune p5"] == 1.5 and m["fine-tune p50"] == 10.0 and m["fine-tune full"] == 30.0
    assert m["GrADS selection / full FT"] == round(14.0 / 30.0, 2)
    # the same runs collected again after a rerun where every stage was a cache hit: the same model
    hits = df.assign(**{f"{st}_cached": True for st in ("warmup", "features", "finetune")})
    again = cost_model(hits, exclude=CHEAP_VARIANTS).iloc[0]
    assert again["grad-norm pass"] == 4.0 and again["baseline passes"] == 2.0
    assert again["fine-tune p50"] == 10.0 and again["warm-up"] == 10.0


def test_table1_gets_the_best_other_rule_and_table2_a_verdict(tmp_path, capsys):
    """Ablation runs stay out of Table 1 except the best non-default one (renamed); the summary across
    domains ranks them against random and names a winner; rebuilding from the CSV is identical."""
    from grads.paper.decisions import ablation_summary
    from grads.paper.frames import best_other_rule
    from grads.paper.protocol import BEST_OTHER, default_grads_run

    sweep = tmp_path / "sweep"
    _paired_sweep(sweep)  # medical: random, grads x 3 seeds, domain_bpb 0.5
    default = default_grads_run()
    assert default == "grads.density_x_magnitude.embed+lm_head"
    bpb = {  # the default is the lowest, so it must not be picked as the best *other* rule
        default: 0.40,
        "grads.density.embed": 0.45,
        "grads.density.lm_head": 0.48,
        "grads.magnitude.embed+lm_head": 0.55,
    }
    for i, (name, value) in enumerate(bpb.items()):
        _ablation_job(sweep, f"abl{i}", name, seed=0, domain_bpb=value)
    # a Table 1 GrADS variant ranks with them (seed 0 only, as the ablation) but is no rule winner
    _ablation_job(sweep, "paper0", "grads_paper", seed=0, domain_bpb=0.30)
    _ablation_job(sweep, "paper1", "grads_paper", seed=1, domain_bpb=0.10)
    main([str(sweep), "--out", str(tmp_path / "rep")])
    capsys.readouterr()
    df = pd.read_csv(tmp_path / "rep" / "results.csv")
    assert best_other_rule(df) == {"medical": "grads.density.embed"}
    md = (tmp_path / "rep" / "results.md").read_text()
    table1 = md.split("## medical\n")[1].split("\n## ")[0]
    assert f"| grads.density.embed{BEST_OTHER} |" in table1
    assert "grads.density.lm_head" not in table1 and "grads.magnitude" not in table1
    paired1 = md.split("## medical: paired difference vs random")[1].split("\n## ")[0]
    assert (
        f"grads.density.embed{BEST_OTHER}" in paired1 and "| grads.density.lm_head |" not in paired1
    )
    table, winner, _ = ablation_summary(df)
    assert winner == default
    assert list(table.index)[:3] == ["grads_paper", default, "grads.density.embed"]
    assert table.loc["grads_paper", "Δ bpb medical"] == pytest.approx(-0.2)  # seed 1 left out
    assert "among all GrADS variants, grads_paper ranks first" in md
    assert table.loc["grads.magnitude.embed+lm_head", "Δ bpb medical"] == pytest.approx(0.05)
    assert (
        f"Winner of the `grads` rule x source grid by mean rank over the 1 domain(s) with ablation "
        f"runs: **{default}** (the current default)"
    ) in md
    assert (tmp_path / "rep" / "ablation_domain_bpb.png").is_file()
    main(["--from-csv", str(tmp_path / "rep" / "results.csv"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "results.md").read_text() == md


def test_table2_default_cell_is_table1s_grads_run(tmp_path, capsys):
    """Without a run named after the default rule, the grads run of the seeds the ablation ran fills
    the default cell (grid and summary); the CSV and the cost table keep the runs as they ran."""
    from grads.paper.decisions import ablation_summary
    from grads.paper.frames import with_default_cell
    from grads.paper.protocol import default_grads_run

    sweep = tmp_path / "sweep"
    _paired_sweep(sweep)  # grads seeds 0-2 are jobs 3-5
    _ablation_job(sweep, "abl", "grads.density.embed", seed=0, domain_bpb=0.6)
    for sel in ("random", "grads"):  # a 50 % column without ablation runs: no empty grid for it
        _ablation_job(sweep, f"{sel}50", sel, seed=0, budget="p50")
    main([str(sweep), "--out", str(tmp_path / "rep")])
    capsys.readouterr()
    df = pd.read_csv(tmp_path / "rep" / "results.csv")
    default = default_grads_run()
    assert default not in set(df["selector"])
    derived = with_default_cell(df)
    cell = derived[derived["selector"] == default]
    assert list(cell["seed"]) == [0] and [str(j) for j in cell["job"]] == ["3"]
    table, winner, _ = ablation_summary(derived)
    assert winner == default and table.loc["grads.density.embed", "Δ bpb medical"] == pytest.approx(
        0.1
    )
    md = (tmp_path / "rep" / "results.md").read_text()
    grid = md.split("ablation, Domain bpb vs random")[1].split("\n## ")[0]
    both = next(line for line in grid.splitlines() if line.startswith("| density_x_magnitude |"))
    assert both.split("|")[-2].strip().endswith("▲")  # grads's seed-0 win over random, in the grid
    assert "medical p5: ablation" in md and "medical p50: ablation" not in md
    cost = md.split("## cost (seconds)")[1]
    assert default not in cost


def test_headline_plot_needs_both_headline_metrics(tmp_path):
    from grads.report import headline_plot

    rows = [
        {"selector": s, "budget": b, "seed": k, "domain_bpb": 0.9 - 0.01 * k, "general_kl": 0.03}
        for s, b in (("random", "p5"), ("grads", "p5"), ("grads", "p50"), ("full", "p5"))
        for k in range(2)
    ]
    df = pd.DataFrame(rows)
    path = headline_plot(df, "legal", tmp_path)
    assert path == tmp_path / "bpb_vs_kl_legal.png" and path.stat().st_size > 0
    assert headline_plot(df.drop(columns="general_kl"), "legal", tmp_path / "none") is None


def test_runs_are_named_by_the_cell_they_ran_when_the_default_changes(tmp_path):
    """A later change of the grads default (conf/selector/grads.yaml) must not mislabel runs: the
    old default's `grads` runs become their Table 2 cell, and the new default's cell runs become
    Table 1's `grads` row (with their seeds); under the default they ran with, nothing moves."""
    from grads.paper.frames import as_current_default, collect, table1_frame, with_default_cell

    job = tmp_path / "j"
    job.mkdir()
    cfg = job / "config_resolved.yaml"
    cfg.write_text(
        "selector:\n  name: grads\n  rule: density_x_magnitude\n  layers: [embed, lm_head]\n"
    )
    m = {"domain": "legal", "selector": "grads", "budget": "p5", "seed": 0, "domain_bpb": 0.5}
    (job / "metrics.json").write_text(json.dumps(m))
    assert collect(tmp_path)[0][0]["grads_cell"] == "grads.density_x_magnitude.embed+lm_head"

    old, new = "grads.density_x_magnitude.embed+lm_head", "grads.density.embed+lm_head"

    def run(sel, cell, budget, seed, bpb):
        return {"domain": "legal", "selector": sel, "grads_cell": cell, "budget": budget,
                "seed": seed, "domain_bpb": bpb, "job": f"{sel}/{budget}/{seed}"}  # fmt: skip

    runs = [run("random", None, b, s, 0.9) for b in ("p5", "p50") for s in range(3)]
    runs += [run("grads", old, "p5", s, 0.88) for s in range(3)] + [
        run("grads", old, "p50", 0, 0.7)
    ]
    runs += [run(new, new, "p5", s, 0.86) for s in range(3)]  # ablation cell + ablation_seeds
    runs += [run("grads.magnitude.embed", "grads.magnitude.embed", "p5", 0, 0.99)]
    df = pd.DataFrame(runs)
    # Under the default the runs were made with: names unchanged, the default cell from `grads`
    same = with_default_cell(as_current_default(df, old), old)
    assert (same["selector"] == "grads").sum() == 4
    assert set(same.loc[same["selector"] == old, "seed"]) == {0, 1, 2}
    # After the default changes to `density`:
    moved = with_default_cell(as_current_default(df, new), new)
    grads = moved[moved["selector"] == "grads"]
    assert sorted(zip(grads["budget"], grads["seed"])) == [("p5", 0), ("p5", 1), ("p5", 2)]
    assert (grads["domain_bpb"] == 0.86).all()  # the new default's runs
    cell = moved[moved["selector"] == old]
    assert sorted(zip(cell["budget"], cell["seed"])) == [
        ("p5", 0),
        ("p5", 1),
        ("p5", 2),
        ("p50", 0),
    ]
    t1 = table1_frame(moved, default=new)
    kept = t1[t1["selector"] == old]
    assert list(zip(kept["budget"], kept["domain_bpb"])) == [("p50", 0.7)]  # earlier default, 50 %
    assert not ((t1["selector"] == old) & (t1["budget"] == "p5")).any()  # p5 cells are Table 2's
    best = t1[t1["selector"].str.endswith("(best other rule)")]
    assert set(best["selector"]) == {old + " (best other rule)"}  # 0.88 beats magnitude's 0.99


def test_table1_notes_subsets_smaller_than_the_budget():
    """IFD without a score for one-token answers trained on fewer samples: Table 1 says so."""
    from grads.paper.tables import _short_subset_note

    df = pd.DataFrame(
        [
            {"selector": s, "budget": b, "n_selected": n}
            for s, b, n in [
                ("random", "p5", 50), ("ifd", "p5", 27), ("ifd", "p5", 27), ("full", "p5", 1000),
                ("random", "p50", 500), ("ifd", "p50", 500),
            ]
        ]
    )  # fmt: skip
    note = _short_subset_note(df)
    assert note.strip() == (
        "Smaller subsets: ifd (p5) trained on 27 samples, not 50 (the selector had fewer candidates)."
    )
    assert _short_subset_note(df[df["selector"] != "ifd"]) == ""


def test_default_decision_pairs_the_winner_with_the_default(tmp_path, capsys):
    """Table 2's winner is paired with the default cell itself (not each with random): it replaces
    the default only when significantly better on domain bpb and significantly worse on neither
    headline metric; a domain without Table 2 runs leaves the decision open."""
    import numpy as np

    from grads.paper.decisions import default_decision
    from grads.paper.frames import as_current_default, with_default_cell
    from grads.paper.protocol import default_grads_run
    from grads.report import read_csvs

    def sweep_with(name, kl, extra_domain=False):
        sweep = tmp_path / name
        _paired_sweep(sweep)  # medical: random and grads (the default cell), seeds 0-2
        base = json.loads((sweep / "3" / "metrics.json").read_text())["items"]["base"]
        for s in range(3):  # the winner: same tokens as grads's seed-s run, lower loss
            tuned = _items(np.random.default_rng(s * 7 + 1), 80, -0.4, kl)
            items = {"tuned": tuned, "base": base}
            _ablation_job(
                sweep, f"w{s}", "grads.density.embed", seed=s, domain_bpb=0.3, items=items
            )
        if extra_domain:  # a second domain with Table 1 runs but no Table 2 yet
            for i in range(6):
                job = sweep / f"legal{i}"
                job.mkdir()
                (job / "config_resolved.yaml").write_text("seed: 0\n")
                m = json.loads((sweep / str(i) / "metrics.json").read_text())
                (job / "metrics.json").write_text(json.dumps({**m, "domain": "legal"}))
        main([str(sweep), "--out", str(tmp_path / f"{name}_rep")])
        capsys.readouterr()
        return read_csvs([tmp_path / f"{name}_rep" / "results.csv"])

    default = default_grads_run()
    df, items = sweep_with("same_kl", kl=0.09)  # grads's KL: identical per item
    frame = with_default_cell(as_current_default(df))
    rows, verdict = default_decision(frame, items)
    assert verdict == "change" and [r["domain"] for r in rows] == ["medical"]
    assert rows[0]["seeds"] == 3 and rows[0]["domain_bpb"].hi < 0
    assert rows[0]["general_kl"].mean == pytest.approx(0.0)
    md = (tmp_path / "same_kl_rep" / "results.md").read_text()
    assert f"## the default rule: grads.density.embed vs {default} at 5 % (paired)" in md
    assert "Decision over medical: **change the default to grads.density.embed**." in md
    assert default_decision(frame, None) == ([], None)  # no per-item results: no decision

    df, items = sweep_with("more_kl", kl=0.2)  # learns more, forgets more: keep
    rows, verdict = default_decision(with_default_cell(as_current_default(df)), items)
    assert verdict == "keep" and rows[0]["general_kl"].lo > 0

    df, items = sweep_with("pending", kl=0.09, extra_domain=True)
    rows, verdict = default_decision(with_default_cell(as_current_default(df)), items)
    assert verdict is None and [r["domain"] for r in rows] == ["legal", "medical"]
    assert rows[0]["domain_bpb"] is None
    md = (tmp_path / "pending_rep" / "results.md").read_text()
    assert "Decision over legal, medical: **not decided**" in md


def test_read_csvs_skips_csvs_that_are_not_collected_sweeps(tmp_path, capsys):
    """`results/tables/*/*.csv` also matches each domain's pool_features.csv: skipped, said so."""
    from grads.report import read_csvs

    run = tmp_path / "legal.csv"
    run.write_text("job,selector,domain\n0,random,legal\n")
    pool = tmp_path / "pool_features.csv"
    pool.write_text("id,source,loss\nx,a,0.1\n")
    df, items = read_csvs([run, pool])
    assert df["job"].tolist() == [0]  # one sweep left: its job names are not prefixed
    assert items is None and "skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="collected sweep"):
        read_csvs([pool])
