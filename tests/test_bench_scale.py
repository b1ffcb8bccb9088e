"""The pool-scaling benchmark (``scripts/bench_scale.py``): its generated pools, its memory
measurement, its commands and, end to end on two tiny pools (slow: seven child processes), its
table and its resuming."""

from __future__ import annotations

import importlib.util
import json
import sys

import psutil
import pytest

from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location(
        "bench_scale", REPO / "scripts" / "bench_scale.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _script()


def test_pool_is_distinct_short_alpaca_records_written_once(tmp_path):
    from grads.models import tiny_tokenizer

    path = bench.ensure_pool(tmp_path, 700)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 700 and path.name == f"pool_n700_v{bench.FORMAT_VERSION}.jsonl"
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert len({(r["instruction"], r["input"], r["output"]) for r in rows}) == 700
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    tok = tiny_tokenizer()
    lengths = []
    for r in rows:  # the custom domain's Alpaca prompt, in the tiny model's chat template
        prompt = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
        text = tok.apply_chat_template(chat, tokenize=False)
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    assert min(lengths) >= 60 and max(lengths) <= 120
    # record i is a function of i alone (every pool extends the smaller ones); no rewrite
    assert bench.pool_record(699) == rows[699]
    before = path.stat().st_mtime_ns
    assert bench.ensure_pool(tmp_path, 700) == path and path.stat().st_mtime_ns == before


def test_measure_reports_the_peak_of_the_child_and_of_its_children(tmp_path):
    hold = "b = bytearray({n}); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)"
    child = [sys.executable, "-c", hold.format(n=300_000_000)]
    # A child is started by (v)fork from this process: until its exec it maps this process's
    # memory, which the kernel's high-water mark (and a sample taken at that instant) may count.
    parent = psutil.Process().memory_info().rss / bench.GB
    rec = bench.measure(child, {}, tmp_path / "a" / "log")
    assert rec["rc"] == 0 and rec["wall_s"] > 0.5
    assert 0.3 <= rec["peak_rss_gb"] < 0.5 + parent
    assert 0.3 <= rec["tree_peak_gb"] < 0.5 + parent  # sampled while it slept
    assert 0.28 <= rec["anon_peak_gb"] < 0.5 + parent  # the bytearray is anonymous memory
    # a grandchild's peak counts once the child has waited for it
    outer = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hold.format(n=250_000_000)!r}])"
    rec = bench.measure([sys.executable, "-c", outer], {}, tmp_path / "b" / "log")
    assert rec["rc"] == 0 and rec["peak_rss_gb"] >= 0.25 and rec["tree_peak_gb"] >= 0.25
    failed = bench.measure(
        [sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "c" / "log"
    )
    assert failed["rc"] == 3


def test_stage_commands_compose_and_select_runs_grads_select(tmp_path):
    from hydra import compose, initialize_config_dir

    args = bench.parse_args(["--sizes", "1e3", "--out", str(tmp_path), "--warmup-samples", "50"])
    assert args.sizes == [1000]
    pool = bench.ensure_pool(tmp_path, 50)
    cmds = {s: bench.stage_command(s, pool, tmp_path, tmp_path / s, args) for s in bench.STAGES}
    assert cmds["warmup"][1:3] == ["-m", "grads.cli.main"] and "stages=[warmup]" in cmds["warmup"]
    assert "stages=[warmup,features]" in cmds["features"]
    assert cmds["select"][1:3] == ["-m", "grads.cli.select"]
    assert not any(c.startswith("stages=") for c in cmds["select"])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for stage, cmd in cmds.items():
            cfg = compose("config", [c for c in cmd[3:] if not c.startswith("hydra.")])
            assert cfg.domain.path == str(pool) and cfg.paths.cache_dir == str(tmp_path / "cache")
            assert cfg.model.name == "tiny" and cfg.warmup.max_samples == 50
            if stage != "select":
                assert list(cfg.stages) == list(bench.STAGES[: bench.STAGES.index(stage) + 1])


def test_a_child_that_computed_another_stage_or_found_its_own_cached_is_flagged(tmp_path):
    def note(misses):
        (tmp_path / "metrics.json").write_text(
            json.dumps({"cost": {"features": {"wall_s": 2.5}}, "cache_misses": misses})
        )
        return bench._from_metrics("features", tmp_path)

    assert note(["features"]) == {
        "stage_s": 2.5,
        "cache_misses": ["features"],
        "n_pool": None,
        "note": "",
    }
    assert "also computed ['warmup']" in note(["warmup", "features"])["note"]
    assert "was cached" in note([])["note"]


@pytest.mark.slow
def test_two_tiny_pools_end_to_end_then_resumed(tmp_path):
    out = tmp_path / "bench"
    argv = ["--sizes", "300", "600", "--out", str(out), "--warmup-samples", "100"]
    assert bench.main(argv) == 0
    report = json.loads((out / "bench_scale.json").read_text())
    assert [r["n"] for r in report["rows"]] == [300, 600]
    for row in report["rows"]:
        assert row["ok"] and row["n_pool"] == row["n"]  # every record distinct and valid
        for stage in bench.STAGES:
            rec = row["stages"][stage]
            assert rec["rc"] == 0 and rec["note"] == "", (stage, rec)
            assert rec["cache_misses"] == [stage]  # each child computed its own stage only
            assert 0 < rec["stage_s"] < rec["wall_s"] and rec["peak_rss_gb"] > 0
    assert report["baseline"]["peak_rss_gb"] > 0
    time_ratio = report["ratios"]["time_per_sample_vs_smallest"]
    assert set(time_ratio) == set(bench.STAGES) and time_ratio["features"]["300"] == 1.0
    assert set(report["ratios"]["rss_excl_model_largest_vs_smallest"]) >= set(bench.STAGES)
    table = (out / "bench_scale.md").read_text()
    assert "\n| 300 | 300 |" in table and "\n| 600 | 600 |" in table
    # a second run reuses the pools, the cache and the measurements: nothing runs again
    logs = sorted(out.glob("runs/*/*/child.log"))
    mtimes = [p.stat().st_mtime_ns for p in logs]
    assert bench.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in logs] == mtimes
    again = json.loads((out / "bench_scale.json").read_text())
    assert all(rec.get("reused") for r in again["rows"] for rec in r["stages"].values())
    assert (out / "bench_scale.md").read_text() == table


def test_a_failed_stage_is_a_failed_row_and_keep_going_goes_on(tmp_path, monkeypatch):
    calls = []

    def fake_measure(cmd, env, log_path):  # no child: the stage "runs" as its folder says
        stage, size = log_path.parent.name, log_path.parent.parent.name
        calls.append((size, stage))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("boom\n")
        if (size, stage) == ("n5", "features"):
            return {
                "rc": 1,
                "wall_s": 1.0,
                "peak_rss_gb": 0.5,
                "tree_peak_gb": 0.5,
                "log": str(log_path),
            }
        metrics = {"cost": {stage: {"wall_s": 2.0}}, "cache_misses": [stage], "n_pool": 7}
        (log_path.parent / "metrics.json").write_text(json.dumps(metrics))
        return {
            "rc": 0,
            "wall_s": 3.0,
            "peak_rss_gb": 0.6,
            "tree_peak_gb": 0.6,
            "log": str(log_path),
        }

    monkeypatch.setattr(bench, "measure", fake_measure)
    argv = ["--sizes", "7", "5", "--out", str(tmp_path)]
    assert bench.main(argv) == 1  # stops after the failure
    assert calls == [("runs", "baseline"), ("n5", "warmup"), ("n5", "features")]
    calls.clear()
    assert bench.main([*argv, "--keep-going"]) == 1  # the failed stage again, then size 7
    assert calls == [("n5", "features"), ("n7", "warmup"), ("n7", "features"), ("n7", "select")]
    report = json.loads((tmp_path / "bench_scale.json").read_text())
    first, second = report["rows"]
    assert not first["ok"] and first["stages"]["features"]["rc"] == 1
    assert "select" not in first["stages"] and second["ok"]
    assert report["ratios"]["smallest"] == report["ratios"]["largest"] == 7
    table = (tmp_path / "bench_scale.md").read_text()
    assert "| failed | - | - | - |" in table and "failed (exit 1)" in table


def test_rerun_of_one_stage_forgets_it_and_what_follows_only(tmp_path):
    out = tmp_path / "bench"
    for stage in bench.STAGES:
        (out / "cache" / stage / "0123").mkdir(parents=True)
        for n in ("n300", "n600"):
            (out / "runs" / n / stage).mkdir(parents=True)
            (out / "runs" / n / stage / "measure.json").write_text("{}")
    (out / "pools").mkdir()
    bench.forget(out, ["select"])
    kept = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert kept == {
        f"runs/{n}/{s}/measure.json" for n in ("n300", "n600") for s in bench.MODEL_STAGES
    }
    assert (
        not (out / "cache" / "select").exists() and (out / "cache" / "features" / "0123").is_dir()
    )
    bench.forget(out, [])  # --rerun alone: everything but the pools
    assert sorted(p.name for p in out.iterdir()) == ["pools"]
    assert bench.parse_args(["--rerun", "features"]).rerun == ["features"]
    assert bench.parse_args(["--rerun"]).rerun == [] and bench.parse_args([]).rerun is None
