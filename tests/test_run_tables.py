"""The phases of the real-domain tables (``scripts/run_tables.py``, :mod:`grads.paper.phases`) and
how the strongest baselines are chosen (the commands are composed and checked, nothing is trained)."""

from __future__ import annotations

import json

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from grads.paper import decisions, phases, protocol, publish, results_md, views
from grads.paper.protocol import default_grads_run
from tests.conftest import REPO


def _metrics(root, i, selector, bpb):
    job = root / "main_p5" / str(i)
    job.mkdir(parents=True)
    (job / "config_resolved.yaml").write_text("seed: 0\n")
    m = {"domain": "legal", "selector": selector, "budget": "p5", "seed": 0, "domain_bpb": bpb}
    (job / "metrics.json").write_text(json.dumps(m))


def _run(root, phase, name, selector, bpb, seed=0, domain="legal"):
    """A finished 5 % job ``root/phase/name`` of ``selector`` with held-out bpb ``bpb``."""
    d = root / phase / str(name)
    d.mkdir(parents=True)
    (d / "config_resolved.yaml").write_text("seed: 0\n")
    m = {"domain": domain, "selector": selector, "budget": "p5", "seed": seed, "domain_bpb": bpb}
    (d / "metrics.json").write_text(json.dumps({**m, "general_kl": 0.05}))


def _grid_cells():
    """Table 2's (ablation phase, cell name) pairs but the default's (main_p5's grads run)."""
    cells = [
        (ph, f"grads.{r}.{src}")
        for ph, src in protocol.ablation_sources().items()
        for r in protocol.rules()
    ]
    return [(ph, n) for ph, n in cells if n != default_grads_run()]


def test_strongest_baselines_rank_by_heldout_bpb_and_feed_the_later_phases(tmp_path):
    bpb = {"loss_high": 0.70, "gradnorm": 0.66, "ifd": 0.64, "length": 0.69, "less": 0.65}
    for i, (sel, v) in enumerate(bpb.items()):
        _metrics(tmp_path, i, sel, v)
    with pytest.raises(SystemExit, match="rds"):  # one baseline missing: no guess
        decisions.strongest_baselines(tmp_path)
    _metrics(tmp_path, 9, "rds", 0.67)
    plan = decisions.strongest_baselines(tmp_path)
    assert plan["strongest"][:2] == ["ifd", "less"]
    seeds = phases.phase_overrides("seeds_p5", plan)
    assert "selector=random,grads,grads_paper,ifd,less" in seeds and "seed=1,2" in seeds
    assert "selector=random,grads,grads_paper,ifd" in phases.phase_overrides("main_p50", plan)


def test_best_ablation_cell_gets_the_extra_seeds(tmp_path):
    """ablation_seeds: the best non-default Table 2 cell at seed 0 (the default is main_p5's grads,
    which has its seeds), chosen only once the grid is complete and merged into plan.json."""

    def job(phase, i, name, bpb, seed=0):
        _run(tmp_path, phase, i, name, bpb, seed)

    cells = _grid_cells()
    for i, (ph, name) in enumerate(cells[:-1]):
        job(ph, i, name, 0.90 + 0.001 * i)
    with pytest.raises(SystemExit, match="13 of its 14 cells"):  # grid incomplete: no pick yet
        decisions.best_ablation_cell(tmp_path)
    job(cells[-1][0], 99, cells[-1][1], 0.80)
    job("ablation_both", 100, default_grads_run(), 0.70)  # a default cell would never be picked
    job("ablation_embed", 101, "grads.density.embed", 0.50, seed=1)  # seed 1 does not count
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"strongest": ["ifd", "less"]}))
    plan = phases.phase_plan("ablation_seeds", tmp_path, plan_file, dry_run=False)
    rule, source = cells[-1][1].split(".")[1:]
    assert plan["best_cell"] == cells[-1][1] and plan["rule"] == rule
    assert json.loads(plan_file.read_text())["strongest"] == ["ifd", "less"]  # merged, not replaced
    ov = OverridesParser.create().parse_overrides(phases.phase_overrides("ablation_seeds", plan))
    jobs = BasicSweeper.split_arguments(ov, max_batch_size=None)[0]
    assert sorted(dict(o.split("=", 1) for o in j)["seed"] for j in jobs) == ["1", "2"]
    assert all(f"selector.layers=[{source.replace('+', ',')}]" in j for j in jobs)


def test_leader_seeds_follow_the_cross_domain_leader(tmp_path, monkeypatch, capsys):
    """leader_seeds: the Table 2 cell leading across domains (this domain's grid + the other
    domains' CSVs beside the results folder) gets the seeds it lacks here, in a folder of its own;
    nothing runs once it has them, or when the leader is the default."""

    import pandas as pd

    runs, tables = tmp_path / "runs", tmp_path / "tables"

    def job(phase, name, selector, bpb, seed=0):
        _run(runs, phase, name, selector, bpb, seed, domain="medical")

    job("main_p5", "0", "random", 0.90)
    job("main_p5", "1", "grads", 0.85)
    cells = _grid_cells()
    medical_best, leader = "grads.density.embed", "grads.stratified.lm_head"
    for i, (ph, name) in enumerate(cells):
        bpb = {medical_best: 0.80, leader: 0.81}.get(name, 0.95 + 0.001 * i)
        job(ph, str(i), name, bpb)
    # financial, collected: the leader is its best cell, medical's best is poor there
    (tables / "financial").mkdir(parents=True)
    fin = [("random", 0.90), (leader, 0.50), ("grads.magnitude.embed", 0.60), (medical_best, 0.95)]
    pd.DataFrame(
        [
            {
                "domain": "financial",
                "selector": sel,
                "budget": "p5",
                "seed": 0,
                "domain_bpb": v,
                "general_kl": 0.05,
                "job": str(i),
            }
            for i, (sel, v) in enumerate(fin)
        ]  # fmt: skip
    ).to_csv(tables / "financial" / "financial.csv", index=False)
    plan_file = tables / "medical" / "plan.json"
    plan_file.parent.mkdir()
    assert decisions.best_ablation_cell(runs)["best_cell"] == medical_best  # ablation_seeds's pick
    plan = phases.phase_plan("leader_seeds", runs, plan_file, dry_run=False, domain="medical")
    assert plan["leader"] == leader and plan["leader_seeds"] == [1, 2]
    assert plan["leader_over"] == ["financial", "medical"]
    assert json.loads(plan_file.read_text())["leader"] == leader
    assert phases.phase_dir("leader_seeds", plan, runs) == runs / "leader_seeds" / leader
    ov = phases.phase_overrides("leader_seeds", plan)
    assert (
        "selector.rule=stratified" in ov and "selector.layers=[lm_head]" in ov and "seed=1,2" in ov
    )
    # each job folder is named by its seed: a rerun for the seeds still missing (seed 2 after seed
    # 1 finished) must not write into the first job's folder, as Hydra's job numbers would
    from omegaconf import OmegaConf

    from tests.conftest import compose

    one_job = [o if not o.startswith("seed=") else "seed=2" for o in ov]
    hydra_cfg = compose([*one_job, "domain=medical"], return_hydra_config=True)
    assert OmegaConf.to_container(hydra_cfg.hydra.sweep, resolve=True)["subdir"] == "seed2"

    job(f"leader_seeds/{leader}", "0", leader, 0.82, seed=1)  # seed 1 ran: only seed 2 is left
    plan = decisions.grid_leader("medical", runs, tables)
    assert plan["leader_seeds"] == [2] and "seed=2" in phases.phase_overrides("leader_seeds", plan)
    status = dict((p, (d, n)) for p, d, n in phases.phase_status("medical", runs, plan_file))
    assert status["leader_seeds"] == (1, 2)
    job(f"leader_seeds/{leader}", "1", leader, 0.82, seed=2)
    calls = []
    monkeypatch.setattr(phases.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    phases.main(["medical", "--phases", "leader_seeds", "--runs-dir", str(runs), "--results-dir",
             str(tables / "medical")])  # fmt: skip
    assert not calls and "nothing to run" in capsys.readouterr().out

    job("main_p5", "2", "grads", 0.10, seed=0)  # the default now leads: it has its seeds
    assert decisions.grid_leader("medical", runs, tables)["leader_seeds"] == []


def test_default_p50_runs_a_changed_default_once(tmp_path):
    """default_p50: nothing while main_p50 has no grads run or ran today's default; after the
    default changed, the new default at 50 % in its own folder (the old default's run stays)."""

    def grads_p50(phase, rule):
        d = tmp_path / phase / "1"
        d.mkdir(parents=True)
        (d / "config_resolved.yaml").write_text(
            f"selector:\n  name: grads\n  rule: {rule}\n  layers: [embed, lm_head]\n"
        )
        m = {"domain": "legal", "selector": "grads", "budget": "p50", "seed": 0, "domain_bpb": 0.5}
        (d / "metrics.json").write_text(json.dumps(m))

    default = default_grads_run()
    assert decisions.default_at_p50(tmp_path)["default_p50"] == []  # main_p50 will run the default
    grads_p50("main_p50", "density")  # an earlier default ran at 50 %
    plan = decisions.default_at_p50(tmp_path)
    assert plan == {"default_cell": default, "default_p50": [0]}
    assert phases.phase_dir("default_p50", plan, tmp_path) == tmp_path / "default_p50" / default
    assert "selector=grads" in phases.phase_overrides("default_p50", plan)
    status = {
        p: (d, n) for p, d, n in phases.phase_status("legal", tmp_path, tmp_path / "plan.json")
    }
    assert status["default_p50"] == (0, 1)
    rule = default.split(".")[1]
    grads_p50(f"default_p50/{default}", rule)
    assert decisions.default_at_p50(tmp_path)["default_p50"] == []


def test_phases_that_follow_the_default_refuse_to_overwrite_another_defaults_runs(tmp_path):
    """After the grads default changes, rerunning a finished phase that runs `grads` (or that left
    the old default out of the grid) would overwrite the old default's numbered job folders."""
    default = default_grads_run()
    _, rule, _ = default.split(".")

    def grads_run(phase, name, rule, selector="grads"):
        d = tmp_path / phase / name
        d.mkdir(parents=True)
        (d / "config_resolved.yaml").write_text(
            f"selector:\n  name: {selector}\n  rule: {rule}\n  layers: [embed, lm_head]\n"
        )
        m = {"domain": "legal", "selector": selector, "budget": "p5", "seed": 0, "domain_bpb": 0.5}
        (d / "metrics.json").write_text(json.dumps(m))

    phases.check_default_unchanged("main_p5", tmp_path)  # nothing ran yet
    grads_run("main_p5", "1", rule)
    phases.check_default_unchanged("main_p5", tmp_path)  # ran under today's default
    grads_run("seeds_p5", "2", "density")
    with pytest.raises(SystemExit, match="another grads default"):
        phases.check_default_unchanged("seeds_p5", tmp_path)
    grads_run("ablation_both", "0", "density", "grads.density.embed+lm_head")
    phases.check_default_unchanged("ablation_both", tmp_path)
    grads_run("ablation_both", "1", rule, default)  # the grid was swept without another default
    with pytest.raises(SystemExit, match="give another --runs-dir"):
        phases.check_default_unchanged("ablation_both", tmp_path)
    phases.check_default_unchanged("leader_seeds", tmp_path)  # top-ups never overwrite


def test_every_phase_is_a_valid_sweep_of_every_selector(tmp_path):
    plan = {"strongest": ["ifd", "less"], "rule": "density", "layers": ["embed", "lm_head"]}
    plan |= {"leader_rule": "stratified", "leader_layers": ["lm_head"], "leader_seeds": [1, 2]}
    plan |= {"default_cell": "grads.density.embed", "default_p50": [0], "balanced": phases.BALANCED}
    parser = OverridesParser.create()
    for phase in [
        *phases.PHASES,
        *phases.EXTRA_PHASES,
        *protocol.ablation_sources(),
        *protocol.CHEAP,
    ]:
        if phase in phases.subphases():
            continue
        overrides = parser.parse_overrides(phases.phase_overrides(phase, plan))
        jobs = BasicSweeper.split_arguments(overrides, max_batch_size=None)[0]
        assert jobs, phase
        for sel in {o.split("=", 1)[1] for job in jobs for o in job if o.startswith("selector=")}:
            assert (REPO / "conf" / "selector" / f"{sel}.yaml").is_file(), (phase, sel)
    # Table 2 in three sweeps: every rule x source but the default with both (main_p5's grads run)
    cells = set()
    for phase in protocol.ablation_sources():
        ov = parser.parse_overrides(phases.phase_overrides(phase, plan))
        for job in BasicSweeper.split_arguments(ov, None)[0]:
            kv = dict(o.split("=", 1) for o in job)
            cells.add((kv["selector.rule"], kv["selector.layers"]))
    layers = ["[embed]", "[lm_head]", "[embed,lm_head]"]
    _, d_rule, d_source = default_grads_run().split(".")
    d_cell = (d_rule, f"[{d_source.replace('+', ',')}]")
    assert cells == {(r, src) for r in protocol.rules() for src in layers} - {d_cell}
    # a default with one source leaves its cell out of that source's sweep
    one = phases.ablation_overrides("ablation_lm_head", "grads.density.lm_head")
    assert one == [
        "selector.layers=[lm_head]",
        "selector.rule=magnitude,density_x_magnitude,stratified,adaptive",
    ]
    assert "density" in phases.ablation_overrides("ablation_both", "grads.density.lm_head")[1]
    main_p5 = parser.parse_overrides(phases.phase_overrides("main_p5", plan))
    assert (
        len(BasicSweeper.split_arguments(main_p5, None)[0]) == len(protocol.main_selectors()) == 11
    )


def test_the_phases_read_the_grid_from_the_experiment_files(tmp_path, monkeypatch):
    """Table 1's selectors, baselines and domains come from paper_main.yaml's sweep, Table 2's rules
    and sources from paper_ablation.yaml's: a selector or rule added there is run and ranked."""
    import shutil

    assert protocol.domains() == ["medical", "legal", "financial"]
    sels = protocol.main_selectors()
    assert sels[:2] == ["random", "grads"] and sels[-1] == "full"  # the run order of main_p5
    assert protocol.baselines() == ["loss_high", "gradnorm", "ifd", "length", "less", "rds"]
    assert protocol.ablation_sources() == {
        "ablation_embed": "embed",
        "ablation_lm_head": "lm_head",
        "ablation_both": "embed+lm_head",
    }
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    main_yaml = conf / "experiment" / "paper_main.yaml"
    main_yaml.write_text(main_yaml.read_text().replace(",rds,full", ",rds,loss_low,full"))
    abl_yaml = conf / "experiment" / "paper_ablation.yaml"
    abl_yaml.write_text(abl_yaml.read_text().replace(",adaptive", ""))
    monkeypatch.setenv("GRADS_CONF_DIR", str(conf))
    assert protocol.baselines()[-1] == "loss_low"
    grid = (
        "random,grads,grads_paper,grads_cover,loss_high,gradnorm,ifd,length,less,rds,loss_low,full"
    )
    assert f"selector={grid}" in phases.phase_overrides("main_p5", {})
    assert protocol.rules() == ["density", "magnitude", "density_x_magnitude", "stratified"]
    assert "adaptive" not in phases.ablation_overrides("ablation_embed")[1]
    with pytest.raises(SystemExit, match="loss_low"):  # a baseline of the grid that has not run
        decisions.strongest_baselines(tmp_path)


def test_results_md_block_links_the_generated_tables(tmp_path):
    """RESULTS.md's block of a domain is rewritten with links to the generated files (the tables
    with their sections, the subset views, the plots), relative to RESULTS.md; never a copy."""
    out = tmp_path / "results" / "tables" / "legal"
    out.mkdir(parents=True)
    (out / "legal.md").write_text("# legal\n\n## legal\n| a |\n\n## cost (seconds)\nx\n")
    (out / "sources_legal.md").write_text("| s |\n")
    (out / "forest_legal.png").write_bytes(b"png")
    md = tmp_path / "RESULTS.md"
    md.write_text("intro\n<!-- tables:legal:begin -->\nold\n<!-- tables:legal:end -->\nafter\n")
    assert results_md.update_results_md(md, "legal", out)
    text = md.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| a |" not in text  # a link, not a pasted table
    assert (
        "- Tables: [legal.md](results/tables/legal/legal.md) (CSV, LaTeX and per-item results "
        "beside it): Table 1 (legal); cost." in text
    )
    assert "- Subsets: [sources_legal](results/tables/legal/sources_legal.md)." in text
    assert "- Plots: [forest_legal](results/tables/legal/forest_legal.png)." in text
    assert results_md.update_results_md(md, "legal", out) and md.read_text() == text  # idempotent
    assert not results_md.update_results_md(md, "medical", out)  # no markers: left alone


def test_source_composition_counts_each_subset_against_the_pool(tmp_path):
    sel = tmp_path / "selections"
    sel.mkdir()
    pool = {f"a{i}": "fpb" for i in range(6)} | {f"b{i}": "xbrl" for i in range(4)}
    rows = [
        {"id": i, "rank": r, "score": 0.0, "source": pool[i]}
        for r, i in enumerate(["a0", "b0", "b1", "b2"])
    ]
    (sel / "grads_p5_seed0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    views.source_composition(sel, pool, tmp_path, "legal")
    table = (tmp_path / "sources_legal.md").read_text().splitlines()
    pool_row = next(line for line in table if line.startswith("| pool"))
    grads_row = next(line for line in table if line.startswith("| grads_p5_seed0"))
    assert [c.strip() for c in pool_row.split("|")[2:-1]] == ["60", "40", "10"]
    assert [c.strip() for c in grads_row.split("|")[2:-1]] == ["25", "75", "4"]
    assert (tmp_path / "sources_legal.png").stat().st_size > 1000


def test_subset_profile_from_the_published_pool_features(tmp_path):
    """The pool's features table is published as a small CSV (regenerable without the cache) and
    each subset is profiled against it: median length, mean loss, median norms; full left out."""
    import pandas as pd

    feats = tmp_path / "cache" / "features"
    feats.mkdir(parents=True)
    ids = [f"x{i}" for i in range(10)]
    pd.DataFrame(
        {
            "id": ids,
            "loss": [float(i) for i in range(10)],
            "n_tokens": [3, 3, 3, 3, 3, 10, 20, 30, 40, 50],
            "embed": [5.0 - 0.5 * i for i in range(10)],
            "lm_head": [9.0 - i for i in range(10)],
            "tied": False,
        }
    ).to_parquet(feats / "features.parquet")
    job = tmp_path / "runs" / "main_p5" / "0"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({"artefacts": {"features": str(feats)}}))
    sources = {i: "a" if int(i[1:]) < 5 else "b" for i in ids}
    sel = tmp_path / "out" / "selections"
    sel.mkdir(parents=True)
    for name, chosen in (
        ("short_p5_seed0", ids[:2]),
        ("long_p5_seed0", ids[8:]),
        ("full_p5_seed0", ids),
    ):
        (sel / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": i, "source": sources[i]}) + "\n" for i in chosen)
        )
    pool_csv = tmp_path / "out" / "pool_features.csv"
    assert not publish.publish_pool_features(tmp_path / "nothing", pool_csv, sources)
    assert publish.publish_pool_features(tmp_path / "runs", pool_csv, sources)
    assert list(pd.read_csv(pool_csv).columns) == ["id", "source", *views.PROFILE]
    views.subset_profile(sel, pool_csv, tmp_path / "out", "legal")
    text = (tmp_path / "out" / "profile_legal.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()[4:]}
    assert list(rows) == ["pool", "long", "short"]  # pool first; full is not a subset
    assert [float(c) for c in rows["long"]] == [45.0, 8.5, 0.75, 0.5, 2.0]
    assert [float(c) for c in rows["pool"]] == [6.5, 4.5, 2.75, 4.5, 10.0]
    pool = pd.read_csv(pool_csv)
    rho = pool["embed"].corr(pool["n_tokens"], method="spearman")
    assert f"Spearman with length: embed {rho:+.2f}" in text and rho < -0.8
    assert (tmp_path / "out" / "lengths_legal.png").stat().st_size > 1000
    # --views-only: the same views from the committed files alone (sources from the pool CSV)
    (tmp_path / "out" / "profile_legal.md").unlink()
    views.selection_views("legal", tmp_path / "out")
    assert (tmp_path / "out" / "profile_legal.md").read_text() == text
    assert (
        "| long_p5_seed0  |   0 | 100 |   2 |"
        in (tmp_path / "out" / "sources_legal.md").read_text()
    )
    # one length for every sample (legal's one-token answers): no correlation printed as nan
    const = pd.read_csv(pool_csv).assign(n_tokens=3)
    const.to_csv(pool_csv, index=False)
    views.subset_profile(sel, pool_csv, tmp_path / "out", "legal")
    text = (tmp_path / "out" / "profile_legal.md").read_text()
    assert "nan" not in text and "Every pool sample has 3 supervised tokens" in text


def test_domains_merge_into_the_cross_domain_block(tmp_path, capsys):
    """Each domain's CSV is merged into <results>/tables_all and RESULTS.md's `all` block links it
    with its verdicts (Table 2 across domains, the winner paired with the default); a domain
    without ablation runs still merges."""
    import json

    from grads.paper.tables import main as report_main
    from tests.test_report import _ablation_job, _paired_sweep

    tables = tmp_path / "tables"
    for domain, with_ablation in (("medical", True), ("legal", False)):
        sweep = tmp_path / f"sweep_{domain}"
        _paired_sweep(sweep)
        for f in sweep.rglob("metrics.json"):
            f.write_text(json.dumps({**json.loads(f.read_text()), "domain": domain}))
        if with_ablation:
            _ablation_job(sweep, "abl", "grads.density.embed", seed=0, domain_bpb=0.45)
        report_main([str(sweep), "--out", str(tables / domain), "--title", domain])
    md = tmp_path / "RESULTS.md"
    md.write_text("x\n<!-- tables:all:begin -->\n<!-- tables:all:end -->\ny\n")
    publish.merge_domains(tables, md)
    capsys.readouterr()
    merged = tables.parent / "tables_all"
    assert (merged / "all.csv").is_file() and (merged / "all.md").is_file()
    block = md.read_text().split("<!-- tables:all:begin -->")[1].split("<!-- tables:all:end -->")[0]
    assert block.startswith("\n- Tables: [all.md](tables_all/all.md)")
    assert "Table 1 (legal, medical); paired difference vs random;" in block
    assert "; ablation across domains: difference vs random at 5 %;" in block
    assert "| grads.density.embed |" not in block  # the table itself stays in all.md
    # the verdicts: Table 2's winner, then the winner paired with the default (open while legal
    # has no Table 2)
    assert "by mean rank over the 1 domain(s) with ablation runs: **grads.density.embed**" in block
    assert block.rstrip().endswith("Decision over legal, medical: **not decided** (a domain has no "
                                   "Table 2 run of the winner or the default yet).")  # fmt: skip


def test_selection_overlap_is_jaccard_against_chance(tmp_path):
    sel = tmp_path / "selections"
    sel.mkdir()
    subsets = {
        "a": ["1", "2", "3", "4"],
        "b": ["3", "4", "5", "6"],
        "full": [str(i) for i in range(20)],
    }
    for name, ids in subsets.items():
        (sel / f"{name}_p5_seed0.jsonl").write_text(
            "".join(json.dumps({"id": i}) + "\n" for i in ids)
        )
    (sel / "a_p5_seed1.jsonl").write_text(json.dumps({"id": "9"}) + "\n")  # another seed: ignored
    views.selection_overlap(sel, 20, tmp_path, "legal")
    md = (tmp_path / "overlap_legal.md").read_text()
    assert "share 0.111 in expectation" in md  # 4 / (40 - 4)
    row = next(line for line in md.splitlines() if line.startswith("| a "))
    assert [c.strip() for c in row.split("|")[2:4]] == ["1", "0.333"] and "full" not in md
    assert (tmp_path / "overlap_legal.png").is_file()


def test_a_failed_phase_is_collected_before_the_sweep_stops(tmp_path, monkeypatch):
    """Hydra runs every job of a sweep and then exits non-zero if one failed: what finished is
    collected, and the later phases (which read this one's results) do not start."""
    import subprocess
    import types

    calls, collected = [], []
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(returncode=1),
    )
    monkeypatch.setattr(phases, "collect_domain", lambda *a: collected.append(a))
    with pytest.raises(SystemExit, match="phase main_p5 had failed jobs"):
        phases.main(
            ["legal", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]
        )
    assert len(calls) == 1 and len(collected) == 1  # main_p5 ran and was collected; nothing after


def test_status_counts_finished_and_planned_jobs(tmp_path):
    _metrics(tmp_path, 0, "random", 0.9)
    _metrics(tmp_path, 1, "grads", 0.8)
    status = {
        p: (done, planned)
        for p, done, planned in phases.phase_status("legal", tmp_path, tmp_path / "plan.json")
    }
    assert status["main_p5"] == (2, len(protocol.main_selectors()))
    assert status["seeds_p5"] == (0, 10)  # 5 selectors x 2 seeds, baselines not yet known
    assert status["ablation_seeds"] == (0, 2) and status["grads_rec"] == (0, 1)
    assert status["seeds_p50"] == (0, 4)  # opt-in, but its progress is shown
    every = phases.PHASES + phases.EXTRA_PHASES
    assert list(status) == [p for ph in every for p in phases.subphases().get(ph, [ph])]
    assert not (tmp_path / "plan.json").exists()  # a status never writes the plan


def _pool_run(root, answers):
    """A main_p5 job whose resolved config points at a small pool with these answers."""
    root.mkdir(parents=True, exist_ok=True)
    pool = root / "pool.jsonl"
    pool.write_text(
        "".join(json.dumps({"q": f"clause {i}?", "a": a}) + "\n" for i, a in enumerate(answers))
    )
    job = root / "runs" / "main_p5" / "0"
    job.mkdir(parents=True)
    src = {"name": "mine", "path": str(pool), "prompt": "{q}", "response": "{a}"}
    cfg = {"domain": {"name": "legal", "sources": [src]}, "data": {"dedup": True}}
    (job / "config_resolved.yaml").write_text(json.dumps(cfg))
    return root / "runs"


def test_balanced_phase_runs_only_on_a_label_like_pool(tmp_path, capsys):
    runs = _pool_run(tmp_path / "legal", ["Yes", "No", "None", "Yes"])
    plan = phases.phase_plan("balanced", runs, tmp_path / "legal" / "plan.json", dry_run=False)
    assert plan["balanced"] == phases.BALANCED and plan["answer_classes"] == {
        "No": 1,
        "None": 1,
        "Yes": 2,
    }
    ov = phases.phase_overrides("balanced", plan)
    assert "select.balance=answer" in ov and f"selector={','.join(phases.BALANCED)}" in ov
    from omegaconf import OmegaConf

    from tests.conftest import compose

    one_job = [o if not o.startswith("selector=") else "selector=ifd" for o in ov]
    hydra_cfg = compose([*one_job, "domain=legal"], return_hydra_config=True)
    assert OmegaConf.to_container(hydra_cfg.hydra.sweep, resolve=True)["subdir"] == "ifd"
    free = _pool_run(tmp_path / "medical", [f"answer number {i}" for i in range(25)])
    plan = phases.phase_plan("balanced", free, tmp_path / "medical" / "plan.json", dry_run=False)
    assert plan["balanced"] == [] and "not label-like" in capsys.readouterr().out
    status = dict(
        (p, (d, n)) for p, d, n in phases.phase_status("medical", free, tmp_path / "p.json")
    )
    assert status["balanced"] == (0, 0)
    phases.main(["medical", "--phases", "balanced", "--runs-dir", str(free),
             "--results-dir", str(tmp_path / "medical" / "res")])  # fmt: skip
    assert "== balanced: nothing to run here" in capsys.readouterr().out


def test_profile_shows_each_answers_share_on_a_label_like_pool(tmp_path):
    import pandas as pd

    runs = _pool_run(tmp_path, ["Yes"] * 6 + ["No"] * 3 + ["None"])
    from omegaconf import OmegaConf

    from grads.data.pool import load_records

    cfg = OmegaConf.load(runs / "main_p5" / "0" / "config_resolved.yaml")
    ids = [r.id for r in load_records(cfg.domain, cfg.data)[0]]
    feats = tmp_path / "features"
    feats.mkdir()
    n = len(ids)
    pd.DataFrame({"id": ids, "loss": [0.1] * n, "n_tokens": [1] * n, "embed": [1.0] * n,
                  "lm_head": [2.0] * n}).to_parquet(feats / "features.parquet")  # fmt: skip
    (runs / "main_p5" / "0" / "metrics.json").write_text(
        json.dumps({"artefacts": {"features": str(feats)}})
    )
    pool_csv = tmp_path / "out" / "pool_features.csv"
    assert publish.publish_pool_features(runs, pool_csv, {i: "mine" for i in ids})
    pool = views.read_pool_features(pool_csv)
    assert list(pool.columns) == ["id", "source", "answer", *views.PROFILE]
    assert pool["answer"].tolist().count("None") == 1  # a label, not a missing value
    sel = tmp_path / "out" / "selections"
    sel.mkdir()
    (sel / "yes_p5_seed0.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ids[:2]))
    (sel / "mixed_p5_seed0.jsonl").write_text(
        "".join(json.dumps({"id": i}) + "\n" for i in ids[5:9])
    )
    views.subset_profile(sel, pool_csv, tmp_path / "out", "legal")
    lines = (tmp_path / "out" / "profile_legal.md").read_text().splitlines()
    head = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert head[-3:] == ["% No", "% None", "% Yes"]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[4:]
    }
    assert [float(v) for v in rows["pool"][-3:]] == [30, 10, 60]
    assert [float(v) for v in rows["yes"][-3:]] == [0, 0, 100]
    assert [float(v) for v in rows["mixed"][-3:]] == [75, 0, 25]


def test_selection_map_shows_each_subset_in_the_gradient_norm_plane(tmp_path):
    """One panel per known method (MAP_METHODS order, others left out): the whole pool grey, then
    the selected samples coloured by answer on a label-like pool; map_<domain>.png."""
    import pandas as pd

    ids = [f"x{i}" for i in range(8)]
    pool = pd.DataFrame(
        {
            "id": ids,
            "source": "s",
            "answer": ["Yes", "No"] * 4,
            "n_tokens": 3,
            "loss": 0.1,
            "embed": [1.0 + i for i in range(8)],
            "lm_head": [2.0 + i for i in range(8)],
        }
    )
    out = tmp_path / "out"
    sel = out / "selections"
    sel.mkdir(parents=True)
    pool.to_csv(out / "pool_features.csv", index=False)
    for name, chosen in (("grads", ids[:3]), ("random", ids[4:6]), ("mystery", ids)):
        (sel / f"{name}_p5_seed0.jsonl").write_text(
            "".join(json.dumps({"id": i}) + "\n" for i in chosen)
        )
    subsets = views.selected_subsets(sel, "p5", 0)
    fig = views.map_figure(
        views.read_pool_features(out / "pool_features.csv").set_index("id"),
        {m: subsets[m] for m in views.MAP_METHODS if m in subsets},
    )
    panels = [ax for ax in fig.axes if ax.collections]
    assert [ax.get_title() for ax in panels] == ["random (n=2)", "grads (n=3)"]  # no "mystery"
    counts = [[len(c.get_offsets()) for c in ax.collections] for ax in panels]
    assert counts == [[8, 1, 1], [8, 1, 2]]  # pool, then No, Yes: grads took x0 x1 x2 (Y N Y)
    assert (
        views.selection_map(sel, out / "pool_features.csv", out, "legal") == out / "map_legal.png"
    )
    assert (out / "map_legal.png").stat().st_size > 1000
    pool.drop(columns="answer").to_csv(out / "pool_features.csv", index=False)  # free text
    fig = views.map_figure(
        views.read_pool_features(out / "pool_features.csv").set_index("id"), subsets
    )
    assert [len(c.get_offsets()) for c in fig.axes[0].collections] == [8, 3]  # grads: one colour
    (sel / "random_p5_seed0.jsonl").unlink()
    (sel / "grads_p5_seed0.jsonl").unlink()
    assert views.selection_map(sel, out / "pool_features.csv", out, "legal") is None


def test_seeds_p50_is_opt_in_and_gives_each_job_its_own_folder():
    """seeds_p50 (more compute): seeds 1 and 2 of random and grads at 50 %, each job in
    <selector>_seed<k>; not in the default phase list, which stays the 12-hour protocol."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    assert "seeds_p50" not in phases.PHASES and "seeds_p50" in phases.EXTRA_PHASES
    ov = phases.phase_overrides("seeds_p50", {})
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(ov), None)[0]
    order = [
        (kv["seed"], kv["selector"]) for kv in (dict(o.split("=", 1) for o in j) for j in jobs)
    ]
    # (the run order is Hydra's: experiment=paper_main's sweeper params come first)
    assert sorted(order) == [("1", "grads"), ("1", "random"), ("2", "grads"), ("2", "random")]
    assert all("budget=p50" in j for j in jobs)
    folders = set()
    for job in jobs:
        cfg = compose([*job, "domain=financial"], return_hydra_config=True)
        folders.add(OmegaConf.to_container(cfg.hydra.sweep, resolve=True)["subdir"])
    assert folders == {"random_seed1", "grads_seed1", "random_seed2", "grads_seed2"}
    with pytest.raises(SystemExit):  # asked for by name only
        phases.main(["financial", "--phases", "nonsense", "--dry-run"])
