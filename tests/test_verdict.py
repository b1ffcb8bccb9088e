"""``grads-verdict``: is the subset better than random on this pool?

Fast checks of the settings, the job plan (held-out split, lean evaluation, shared warm-up and
features), the statistics and words on constructed per-item results; then the command end to end on
a generated pool with the tiny model, where a selector rigged to pick the worst samples (``length``
on a pool with a planted cluster of the longest responses, all garbage) must be reported as worse
than random.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grads.config import ConfigError
from grads.verdict import analysis, plan
from grads.verdict.settings import verdict_settings
from tests.conftest import CONF_DIR, REPO

GARBAGE_PROMPT = "Recite the archive."


def compose_verdict(overrides: list[str]):
    """``conf/verdict.yaml`` composed as ``grads-verdict`` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("verdict", overrides=overrides)


def rigged_pool(path: Path, n_garbage: int = 24) -> list[dict]:
    """The synthetic domain's short fact and filler pairs (learnable: fixed phrasings over a small
    vocabulary), plus a planted cluster of the longest responses, all symbol garbage under one
    prompt (one held-out key group: it lands wholly in the pool or wholly in the held-out split)."""
    from grads.data import synthetic

    data = synthetic.generate(0, n_entities=20, n_filler=20)
    rows = [
        {"prompt": r["prompt"], "response": r["response"]}
        for r in data["train"]
        if r["kind"] != "profile"
    ]
    rng = random.Random(1)
    symbols = "#@%&*~^|<>{}[]=+$"
    for _ in range(n_garbage):
        garbage = "".join(rng.choice(symbols) for _ in range(160))
        rows.append({"prompt": GARBAGE_PROMPT, "response": garbage})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
def test_settings_name_every_bad_key():
    cfg = {
        "selector": {"name": "grads"},
        "verdict": {
            "seedz": 3,
            "seeds": 0,
            "heldout": -5,
            "eval": "fast",
            "selectors": ["grads", "full", "no_such_selector"],
            "against": "nope",
            "tok_s": {"warmup": 0, "train": 1},
        },
    }
    with pytest.raises(ConfigError) as err:
        verdict_settings(cfg)
    text = str(err.value)
    for key in (
        "verdict.seedz: unknown key",
        "verdict.seeds=0",
        "verdict.heldout=-5",
        "verdict.eval='fast'",
        "'full' keeps the whole pool",
        "unknown selector 'no_such_selector'",
        "verdict.against='nope'",
        "verdict.tok_s.warmup=0",
        "verdict.tok_s.train: unknown stage",
    ):
        assert key in text, key


def test_settings_defaults_and_the_reference_cannot_be_judged():
    s = verdict_settings(compose_verdict([]))
    assert (s.selectors, s.against, s.seeds, s.eval) == ((), "random", 3, "lean")
    assert s.seed_list(4) == [4, 5, 6]
    with pytest.raises(ConfigError, match="also compared"):
        verdict_settings(compose_verdict(["selector=random"]))


def test_heldout_default_is_ten_percent_up_to_300():
    assert plan.heldout_default(235) == 24
    assert plan.heldout_default(50_000) == 300
    assert plan.heldout_default(4) == 1


# --------------------------------------------------------------------------------------------------
# The plan: held-out split, lean evaluation, one warm-up and one features table
# --------------------------------------------------------------------------------------------------
def _custom(tmp_path: Path, extra: list[str] | None = None):
    pool = tmp_path / "pool.jsonl"
    rigged_pool(pool)
    return compose_verdict(
        [
            "domain=custom",
            f"domain.path={pool}",
            "domain.prompt=prompt",
            "domain.response=response",
            "model=tiny",
            "logger=none",
            f"paths.output_dir={tmp_path / 'out'}",
            *(extra or []),
        ]
    )


def test_plan_sets_a_heldout_split_aside_and_shares_warmup_and_features(tmp_path):
    from grads.pipeline import job_identities

    cfg = _custom(tmp_path, ["verdict.selectors=[length,ifd]", "seed=3"])
    s = verdict_settings(cfg)
    base, nodes, ref, info = plan.prepare_base(cfg, s)
    # 235 distinct samples (9 exact duplicates among the generated filler pairs)
    assert base["domain"]["heldout"] == {"n": 24} and info["heldout"]["pool_candidates"] == 235
    assert base["eval"]["general_tasks"] == [] and base["eval"]["text_tasks"] == []
    assert info["eval"]["heldout_tasks"] == ["grads_heldout"]
    assert info["eval"]["kl_task"] == "grads_alpaca_ref"
    assert base["warmup"]["seed"] == 3 and base["export"]["enabled"] is False
    assert base["features"]["ifd"] is True  # ifd needs it, so every job's table has it
    jobs = [plan.make_job(base, n, seed, "compared") for n in nodes for seed in (3, 4)]
    jobs += [
        plan.make_job(base, ref, seed, "reference", plan.count_budget(7), 7) for seed in (3, 4)
    ]
    assert [j.name for j in jobs][-2:] == ["random-n7-s3", "random-n7-s4"]
    keys = [{k: v.key for k, v in job_identities(j.cfg).items()} for j in jobs]
    assert len({(k["warmup"], k["features"]) for k in keys}) == 1
    assert len({k["select"] for k in keys}) == len(jobs)  # selector x seed x budget


def test_the_reference_runs_at_each_compared_size():
    from grads.verdict.runner import reference_jobs

    base = {"selector": {"name": "grads"}, "seed": 0, "budget": {"name": "p5"}}
    ref = {"_target_": "grads.selectors.random.RandomSelector", "name": "random"}
    jobs = reference_jobs(base, ref, [0, 1], {"grads": 50, "ifd": 27}, ref_size=50)
    assert [j.name for j in jobs] == ["random-n27-s0", "random-n27-s1", "random-s0", "random-s1"]
    assert [j.size for j in jobs] == [27, 27, 50, 50]
    assert jobs[2].cfg["budget"] == {"name": "p5"}  # the composed budget where it gives that size
    assert jobs[0].cfg["budget"]["kind"] == "count" and jobs[0].cfg["budget"]["value"] == 27
    assert all(j.cfg["select"]["balance"] is None and j.role == "reference" for j in jobs)


def test_a_domain_with_its_own_heldout_keeps_it_and_eval_none_is_refused(tmp_path):
    cfg = compose_verdict(
        ["domain=synthetic", "model=tiny", f"paths.output_dir={tmp_path}", "verdict.heldout=5"]
    )
    base, _, _, info = plan.prepare_base(cfg, verdict_settings(cfg))
    assert info["heldout"] == {"n": 200, "source": "domain"}
    assert base["domain"]["eval_tasks"] == [] and base["domain"]["eval_tasks_general"] == []
    cfg = compose_verdict(["domain=synthetic", "model=tiny", "eval=none"])
    with pytest.raises(ConfigError, match="use eval=quick"):
        plan.prepare_base(cfg, verdict_settings(cfg))


def test_heldout_split_of_a_custom_pool_holds_its_own_records(tmp_path):
    """The held-out file is built through the custom source's builder, like the pool it leaves."""
    from omegaconf import OmegaConf

    from grads.data.heldout import heldout_records
    from grads.data.pool import load_records

    cfg = _custom(tmp_path, ["domain.heldout.n=24", "domain.heldout.max_frac=0.5",
                             "domain.heldout.only_when_measured=false"])  # fmt: skip
    base = OmegaConf.to_container(cfg, resolve=True)
    held = heldout_records(base)
    pool, _ = load_records(base["domain"], base["data"])
    rows = {(r["prompt"], r["response"]) for r in map(json.loads, open(tmp_path / "pool.jsonl"))}
    assert len(held) == 24 and all((r.prompt, r.response) in rows for r in held)
    assert not {r.id for r in held} & {r.id for r in pool}
    assert all(r.prompt != GARBAGE_PROMPT for r in held)  # the planted cluster stays in the pool


def test_cost_estimate_counts_the_runs_left_and_their_tokens(tmp_path):
    from grads.verdict import cost

    cfg = _custom(tmp_path, ["verdict.selectors=[length]", "budget=n100", "finetune.epochs=2"])
    s = verdict_settings(cfg)
    base, nodes, ref, info = plan.prepare_base(cfg, s)
    profile = cost.pool_profile(base)
    assert profile["n_pool"] == 211  # 235 distinct samples less the 24 held out
    per = profile["tokens_per_sample"]
    assert 20 < per < 256 and profile["pool_tokens"] == pytest.approx(211 * per)
    jobs = [plan.make_job(base, n, seed, "compared") for n in [*nodes, ref] for seed in (0, 1)]
    tokens = cost.token_plan(base, jobs, profile, info)
    assert tokens["warmup"] == {"runs": 1, "tokens": pytest.approx(211 * per), "cached": False}
    assert tokens["features"]["tokens"] == pytest.approx(211 * per)  # one pass: no IFD, no LESS
    assert tokens["finetune"]["runs"] == 4
    assert tokens["finetune"]["tokens"] == pytest.approx(4 * 100 * 2 * per)
    rates = {k: {"tok_s": v, "source": "test"} for k, v in s.tok_s.items()}
    secs = cost.seconds(tokens, rates)
    assert secs["finetune"] == pytest.approx(4 * 100 * 2 * per / s.tok_s["finetune"])
    assert secs["total"] == pytest.approx(sum(v for k, v in secs.items() if k != "total"))
    assert "4 run(s)" in cost.describe(tokens, rates, profile, "estimate")


def test_measured_cost_adds_up_what_the_jobs_computed():
    from grads.verdict.cost import measured

    runs = [
        {"cost": {"warmup": {"wall_s": 10.0, "tokens": 5, "cached": False}}},
        {"cost": {"warmup": {"wall_s": 10.0, "tokens": 5, "cached": True, "peak_rss_gb": 9.0},
                  "finetune": {"wall_s": 2.5, "tokens": 7, "cached": False, "peak_rss_gb": 2.0}}},
        {"cost": {"finetune": {"wall_s": 1.5, "tokens": 3, "cached": False, "peak_rss_gb": 1.5}}},
    ]  # fmt: skip
    out = measured(runs, 20.0)
    assert out["stages"]["warmup"] == {"computed": 1, "wall_s": 10.0, "cached": 1, "tokens": 5}
    # the largest peak of the runs that computed the stage (a cache hit's peak says nothing)
    assert out["stages"]["finetune"] == {
        "computed": 2, "wall_s": 4.0, "cached": 0, "tokens": 10, "peak_rss_gb": 2.0
    }  # fmt: skip


def test_cfg_job_is_instant_and_shows_the_verdict_block():
    code = (
        "import sys\n"
        "sys.argv = ['grads-verdict', '--cfg', 'job', 'experiment=paper_main', 'domain=financial',"
        " 'verdict.selectors=[grads,grads_paper]']\n"
        "from grads.cli.verdict import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'lm_eval', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert "- grads\n  - grads_paper\n" in out.stdout and "group: paper_main" in out.stdout


# --------------------------------------------------------------------------------------------------
# Statistics and words on constructed per-item results
# --------------------------------------------------------------------------------------------------
N_ITEMS = 60


def _items(nll: np.ndarray, kl: np.ndarray, base_nll: np.ndarray) -> dict:
    keys = [f"i{i}" for i in range(N_ITEMS)]
    ones = [10.0] * N_ITEMS

    def held(x):
        return {"grads_heldout": {"keys": keys, "nll": list(x), "tokens": ones, "bytes": ones}}

    kl_part = {"grads_alpaca_ref": {"keys": keys, "kl": list(kl), "tokens": ones}}
    return {
        "tuned": {"domain_loss": held(nll), "kl": kl_part},
        "base": {"domain_loss": held(base_nll)},
    }


def _runs(shift: float, kl_shift: float, base_gap: float, seeds=(0, 1, 2), noise=0.05) -> dict:
    """Per seed: held-out NLL ``1 + shift`` (+ item and seed noise), base NLL ``1 + base_gap``."""
    rng = np.random.default_rng(7)
    item = rng.normal(0, 0.2, N_ITEMS)  # the same items, hard or easy for every model
    out = {}
    for s in seeds:
        seed_noise = np.random.default_rng(100 + s).normal(0, noise)
        nll = 10 * (1 + shift + item + seed_noise + rng.normal(0, 0.01, N_ITEMS))
        kl = 10 * (0.1 + kl_shift + rng.normal(0, 0.005, N_ITEMS))
        out[s] = _items(nll, kl, 10 * (1 + base_gap + item))
    return out


def _judge(compared: dict[str, tuple[float, float]], base_gap: float = 0.5, noise=0.005):
    ref = {"label": "random", "n": 10, "runs": _runs(0.0, 0.0, base_gap, noise=noise)}
    comp = {
        name: {"n": 10, "runs": _runs(s, k, base_gap, noise=noise)}
        for name, (s, k) in compared.items()
    }
    return analysis.assemble(comp, {10: ref}, "random", n_boot=500)


def test_words_follow_the_paired_ci():
    out = _judge({"good": (-0.1, -0.05), "same": (0.0, 0.0), "rigged": (0.3, 0.05)})
    rows = {r["selector"]: r for r in out["selectors"]}
    assert rows["good"]["loss_verdict"] == "beats random"
    assert rows["good"]["forgetting_verdict"] == "forgets less"
    assert rows["rigged"]["loss_verdict"] == "worse than random"
    assert rows["rigged"]["forgetting_verdict"] == "forgets more"
    assert rows["same"]["loss_verdict"] == "ties random"
    # bpb = nll / (ln 2 * bytes): a shift of 0.3 nats per byte is 0.3 / ln 2 bits per byte
    assert rows["rigged"]["domain_bpb"]["diff"] == pytest.approx(0.3 / np.log(2), rel=0.05)
    assert out["winner"]["selector"] == "good" and out["winner"]["role"] == "compared"
    ref = out["references"][0]
    assert ref["detectable"] is True and ref["mdd"]["domain_bpb"] < abs(ref["effect"]["domain_bpb"])
    assert "worse than random on held-out domain loss" in rows["rigged"]["verdict"]


def test_a_pool_too_small_to_tell_says_so_instead_of_guessing():
    # fine-tuning moves held-out bpb by ~0.01 while seeds scatter by ~0.1: nothing is detectable
    out = _judge({"rigged": (0.3, 0.05)}, base_gap=0.01, noise=0.1)
    (row,) = out["selectors"]
    assert row["detectable"] is False
    assert row["loss_verdict"] == row["forgetting_verdict"] == analysis.INCONCLUSIVE
    assert "too small for this verdict to detect anything" in row["verdict"]
    assert out["winner"]["role"] == "reference"


def test_one_seed_has_no_mdd_but_still_a_ci():
    ref = {"label": "random", "n": 10, "runs": _runs(0.0, 0.0, 0.5, seeds=(0,))}
    comp = {"rigged": {"n": 10, "runs": _runs(0.3, 0.0, 0.5, seeds=(0,))}}
    (row,) = analysis.assemble(comp, {10: ref}, "random", n_boot=200)["selectors"]
    assert row["detectable"] is None and row["mdd"]["domain_bpb"] is None
    assert (
        row["loss_verdict"] == "worse than random"
        and "no minimum detectable" in (row["detectable_reason"])
    )


# --------------------------------------------------------------------------------------------------
# The command, end to end: the rigged selector fails
# --------------------------------------------------------------------------------------------------
# The tiny model learns the pool's phrasings within a few full fine-tuning steps at a large rate.
TINY_VERDICT = [
    "model=tiny",
    "logger=none",
    "tuning=full",
    "trainer.lr=3e-3",
    "data.max_seq_len=256",
    "trainer.micro_batch_size=8",
    "trainer.save_every=0",
    "warmup.max_steps=2",
    "eval.task_limits.grads_alpaca_ref=8",
    "eval.batch_size=16",
]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "grads.cli.verdict", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _jobs_bpb(report: dict, selector: str) -> dict[int, float]:
    return {j["seed"]: j["domain_bpb"] for j in report["jobs"] if j["selector"] == selector}


def test_verdict_reports_the_rigged_selector_worse_than_random(tmp_path):
    from grads.data.records import sample_id

    rows = rigged_pool(tmp_path / "pool.jsonl")
    out = _cli(
        [
            "domain=custom",
            "domain.path=pool.jsonl",
            "domain.prompt=prompt",
            "domain.response=response",
            "budget=p10",
            "verdict.selectors=[length]",
            "verdict.seeds=2",
            *TINY_VERDICT,
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "estimated cost" in out.stdout and "worse than random" in out.stdout
    report = json.loads(next((tmp_path / "out" / "runs").rglob("verdict.json")).read_text())
    (row,) = report["selectors"]
    assert row["selector"] == "length" and row["loss_verdict"] == "worse than random"
    assert row["detectable"] is True and row["domain_bpb"]["lo"] > 0
    assert row["general_kl"]["lo"] <= row["general_kl"]["diff"] <= row["general_kl"]["hi"]
    # the paired difference is the mean over seeds of the jobs' own held-out bpb differences
    rig, rnd = _jobs_bpb(report, "length"), _jobs_bpb(report, "random")
    assert row["domain_bpb"]["diff"] == pytest.approx(np.mean([rig[s] - rnd[s] for s in (0, 1)]))
    ref = report["references"][0]
    assert ref["mdd"]["domain_bpb"] < abs(ref["effect"]["domain_bpb"])
    assert ref["effect"]["domain_bpb"] < 0  # the random subsets taught the tiny model something
    # the rigged subset is the planted garbage (22 of its 24 samples: 10 % of the pool) ...
    assert row["n_selected"] == ref["n_selected"] == 22
    select_dir = Path(next(j["select_dir"] for j in report["jobs"] if j["selector"] == "length"))
    lines = (select_dir / "selection.jsonl").read_text().splitlines()
    picked = {json.loads(x)["id"] for x in lines}
    assert picked <= {sample_id(r["prompt"], r["response"]) for r in rows[-24:]}
    # ... and the exported winner is random's subset, with the verdict in its manifest
    assert report["winner"] == {**report["winner"], "selector": "random", "role": "reference"}
    export = Path(report["files"]["export"])
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["verdict"]["selectors"][0]["loss_verdict"] == "worse than random"
    assert manifest["selector"] == "random" and manifest["rows"] == 22
    assert (export / "verdict.json").exists() and (export / "verdict.png").stat().st_size > 5000
    assert report["heldout"]["n"] == 24 and report["eval"]["mode"] == "lean"
    assert report["cache"]["all_shared"] and report["cache"]["jobs"] == 4
    cost = report["cost"]
    assert cost["estimate"]["plan"]["finetune"]["runs"] == 4
    assert cost["measured"]["stages"]["finetune"]["computed"] == 4
    assert cost["measured"]["stages"]["warmup"]["computed"] == 1


@pytest.mark.slow
def test_verdict_leaderboard_on_a_builtin_domain_with_its_own_heldout(tmp_path):
    """Two selectors and three seeds on the synthetic domain (its generated held-out split)."""
    out = _cli(
        [
            "domain=synthetic",
            "domain.pool_limit=200",
            "budget=p25",
            "verdict.selectors=[grads,length]",
            *TINY_VERDICT,
            f"paths.output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(next((tmp_path / "out" / "runs").rglob("verdict.json")).read_text())
    assert report["heldout"] == {"n": 200, "source": "domain"} and report["seeds"] == [0, 1, 2]
    assert [r["selector"] for r in report["selectors"]] == ["grads", "length"]
    assert len(report["jobs"]) == 9 and report["cache"]["all_shared"]
    for row in report["selectors"]:
        assert row["domain_bpb"]["n_seeds"] == 3 and row["domain_bpb"]["n_items"] > 0
        assert row["loss_verdict"] in ("beats random", "ties random", "worse than random")
        assert row["mdd"]["domain_bpb"] is not None
    assert Path(report["files"]["figure"]).exists()
