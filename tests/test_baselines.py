"""The targeted baselines (LESS, RDS+), the joint-KDE GrADS preset and the coverage rule.

Planted tests build pools whose right answer is known: the target set is one cluster of the pool
(LESS and RDS+ must rank that cluster first), and a pool of near-duplicate groups (the coverage
rule must take one of each). The passes are checked against naive references (per-sample autograd
for the LoRA gradients), and each selector runs through the tiny pipeline up to the select stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from grads.data.targets import TargetConfigError, load_target
from grads.features.representations import (
    Projector,
    adam_precondition,
    find_adam_state,
    lora_parameters,
    per_sample_lora_grads,
    pooled_hidden,
    resolve_pass,
)
from grads.features.store import (
    REP_CHUNK_DIR,
    Representation,
    read_representation,
    write_representation,
)
from grads.selectors.base import RepresentationSelector, traits
from grads.selectors.grads_joint import JointDensitySelector, suppress_near_duplicates
from grads.selectors.less import LessSelector, less_scores
from grads.selectors.rds import RDSSelector
from tests.conftest import compose

NEW = ("less", "rds", "grads_paper", "grads_cover")


# ----------------------------------------------------------------------------------------------
# Fixtures: a planted pool


def clustered(n_per: int = 40, d: int = 32, seed: int = 0, noise: float = 0.3):
    """Three clusters A, B, C of ``n_per`` rows each around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d))
    labels = np.repeat(np.array(list("ABC")), n_per)
    x = centres[np.repeat(np.arange(3), n_per)] + noise * rng.normal(size=(3 * n_per, d))
    return x.astype(np.float32), labels, centres, rng


def table_for(ids: np.ndarray, seed: int = 0) -> pd.DataFrame:
    """A features table (shuffled row order) for the given ids."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=ids.size)
    t = pd.DataFrame(
        {
            "id": ids,
            "loss": 1.0 + 0.1 * rng.random(ids.size),
            "embed": np.exp(z),
            "lm_head": np.exp(1.5 + z + 0.3 * rng.normal(size=ids.size)),
        }
    )
    return t.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def planted_target(name: str, groups=("B",), n_target: int = 6):
    """Pool = clusters A, B, C; target = fresh points of the ``groups`` clusters."""
    x, labels, centres, rng = clustered()
    ids = np.array([f"{lab}{i:03d}" for i, lab in enumerate(labels)], dtype=object)
    tgt, tg = [], []
    for g in groups:
        c = "ABC".index(g)
        tgt.append(centres[c] + 0.3 * rng.normal(size=(n_target, x.shape[1])))
        tg += [f"task_{g}"] * n_target
    target = np.concatenate(tgt).astype(np.float32)
    rep = Representation(
        name,
        ids,
        x,
        np.array([f"t{i}" for i in range(len(tg))], dtype=object),
        target,
        np.array(tg, dtype=object),
        meta={"target": {"name": "planted"}},
    )
    return rep, table_for(ids)


# ----------------------------------------------------------------------------------------------
# Planted structure


@pytest.mark.parametrize("selector", [LessSelector(), LessSelector(aggregate="max"), RDSSelector()])
def test_target_cluster_ranks_first(selector):
    rep = planted_target(selector.representations[0])[0]
    table = table_for(rep.pool_ids)
    out = selector.select(table, "n40", 0, {rep.name: rep})
    assert len(out) == 40 and all(i.startswith("B") for i in out.ids)
    assert out.diagnostics["target_size"] == 6 and out.diagnostics["excluded"]["total"] == 0


def test_rds_round_robin_alternates_between_target_tasks():
    rep, table = planted_target("hidden", groups=("B", "C"))
    out = RDSSelector().select(table, "n20", 0, {"hidden": rep})
    firsts = [i[0] for i in out.ids]
    assert firsts[:10] == ["B", "C"] * 5 and sorted(firsts).count("B") == 10
    per_example = RDSSelector(round_robin="examples").select(table, "n20", 0, {"hidden": rep})
    assert set(i[0] for i in per_example.ids) == {"B", "C"}
    assert np.all(np.diff(out.scores) < 0)  # the pick order is the ranking


def test_less_mean_over_group_then_max_over_groups():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    target = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    groups = np.array(["g1", "g2", "g2"], dtype=object)
    np.testing.assert_allclose(less_scores(pool, target, groups), [1.0, 1.0, 0.8], atol=1e-6)
    one = np.array(["g"] * 3, dtype=object)
    np.testing.assert_allclose(
        less_scores(pool, target, one), [1 / 3, 2 / 3, (0.6 + 1.6) / 3], atol=1e-6
    )
    np.testing.assert_allclose(less_scores(pool, target, one, "max"), [1.0, 1.0, 0.8], atol=1e-6)


def near_duplicate_pool(n_items: int = 12, copies: int = 4, d: int = 24, seed: int = 3):
    """``n_items`` distinct samples with ``copies`` near-duplicates each (tiny noise in both the
    representation and the gradient norms); the duplicated items sit in the densest region."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_items, d))
    reps, ids, z = [], [], []
    for i in range(n_items):
        zi = rng.normal(0.0, 0.3)
        for c in range(copies):
            reps.append(base[i] + 0.01 * rng.normal(size=d))
            ids.append(f"item{i:02d}-copy{c}")
            z.append(zi + 0.001 * rng.normal())
    for j in range(40):  # a sparse background of distinct samples far from the dense core
        reps.append(rng.normal(size=d))
        ids.append(f"bg{j:02d}")
        z.append(rng.choice([-1.0, 1.0]) * rng.uniform(3.0, 8.0))
    z = np.array(z)
    ids = np.array(ids, dtype=object)
    table = pd.DataFrame(
        {"id": ids, "loss": np.ones(ids.size), "embed": np.exp(z), "lm_head": np.exp(2 + z)}
    )
    rep = Representation("hidden", ids, np.array(reps, dtype=np.float32))
    return table, rep


def test_coverage_rule_takes_one_of_each_near_duplicate():
    table, rep = near_duplicate_pool()
    k = "n12"
    cover = instantiate(compose(["selector=grads_cover"]).selector)
    out = cover.select(table, k, 0, {"hidden": rep})
    items = [i.split("-")[0] for i in out.ids if i.startswith("item")]
    assert len(items) == len(set(items)) == 12  # one of each, and no background filler needed
    assert out.diagnostics["n_suppressed"] > 0
    dense = JointDensitySelector().select(table, k, 0)  # grads_paper: no suppression
    dense_items = [i.split("-")[0] for i in dense.ids if i.startswith("item")]
    assert len(set(dense_items)) < len(dense_items)  # it takes duplicates
    # A budget above the number of distinct samples is still filled (duplicates last).
    big = cover.select(table, "n80", 0, {"hidden": rep})
    assert len(big) == 80 and big.ids[:52] == out.ids + big.ids[12:52]


def test_grads_paper_picks_the_dense_joint_mode():
    rng = np.random.default_rng(5)
    core = rng.normal([0.0, 2.0], 0.1, size=(300, 2))  # dense, correlated core
    wide = rng.normal([0.0, 2.0], 2.0, size=(700, 2))
    z = np.concatenate([core, wide])
    ids = np.array(
        [f"core{i}" for i in range(300)] + [f"wide{i}" for i in range(700)], dtype=object
    )
    table = pd.DataFrame(
        {"id": ids, "loss": 1.0, "embed": np.exp(z[:, 0]), "lm_head": np.exp(z[:, 1])}
    )
    for bw in ("ISJ", "scott", 0.2):
        out = JointDensitySelector(bandwidth=bw).select(table, "p10", 0)
        share = np.mean([i.startswith("core") for i in out.ids])
        assert share > 0.9, (bw, share)
        assert np.all(np.diff(out.scores) <= 0)


def test_suppression_is_blockwise_equal_to_the_sequential_greedy():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(200, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    order = rng.permutation(200)
    acc_small, dup_small, _ = suppress_near_duplicates(order, v, 0.6, 200, block=7)
    acc_big, dup_big, _ = suppress_near_duplicates(order, v, 0.6, 200, block=1000)
    assert acc_small.tolist() == acc_big.tolist() and dup_small.tolist() == dup_big.tolist()
    kept = v[acc_small]
    gram = kept @ kept.T
    assert (gram[np.triu_indices(len(kept), 1)] < 0.6).all()


# ----------------------------------------------------------------------------------------------
# Contract: determinism, budgets, nesting, errors


@pytest.mark.parametrize("name", NEW)
def test_new_selectors_are_deterministic_nested_and_budgeted(name):
    sel = instantiate(compose([f"selector={name}"]).selector)
    t = traits(sel)
    reps = {}
    if t.representations:
        rep, _ = planted_target(t.representations[0])
        reps = {rep.name: rep}
        table = table_for(rep.pool_ids, seed=1)
        assert isinstance(sel, RepresentationSelector)
    else:
        ids = np.array([f"s{i:03d}" for i in range(120)], dtype=object)
        table = table_for(ids, seed=1)
    table.loc[[3, 7], ["loss", "embed"]] = np.nan  # no supervised token: excluded and counted
    kw = {"reps": reps} if reps else {}
    small = sel.select(table, "p5", 0, **kw)
    big = sel.select(table, "p25", 0, **kw)
    again = sel.select(
        table.sample(frac=1.0, random_state=9).reset_index(drop=True), "p25", 0, **kw
    )
    assert len(small) == round(0.05 * 118) and len(big) == round(0.25 * 118)
    assert big.ids[: len(small)] == small.ids  # a budget sweep only changes the size
    assert again.ids == big.ids  # row order does not matter
    assert small.diagnostics["excluded"]["total"] == 2
    assert np.all(np.diff(big.scores) <= 0) and len(set(big.ids)) == len(big)
    with pytest.raises(ValueError, match="budget=auto"):
        sel.select(table, "auto", 0, **kw)


@pytest.mark.parametrize("name", ["less", "rds", "grads_cover"])
def test_missing_representation_or_target_is_an_actionable_error(name):
    sel = instantiate(compose([f"selector={name}"]).selector)
    rep, table = planted_target(traits(sel).representations[0])
    with pytest.raises(ValueError, match="features stage"):
        sel.select(table, "p10", 0)
    if traits(sel).requires_target:
        bare = Representation(rep.name, rep.pool_ids, rep.pool)
        with pytest.raises(ValueError, match="domain.target"):
            sel.select(table, "p10", 0, {rep.name: bare})


def test_rows_without_a_representation_are_excluded():
    rep, table = planted_target("lora_grads")
    pool = np.array(rep.pool)
    pool[:5] = np.nan  # no supervised token in the gradient pass
    rep = Representation(
        rep.name, rep.pool_ids[:-3], pool[:-3], rep.target_ids, rep.target, rep.target_groups
    )
    out = LessSelector().select(table, "p100", 0, {"lora_grads": rep})
    ex = out.diagnostics["excluded"]
    assert ex["no_representation"] == 3 and ex["nonfinite_representation"] == 5
    assert len(out) == 120 - 8


# ----------------------------------------------------------------------------------------------
# The passes


@pytest.fixture(scope="module")
def lora_tiny():
    from peft import LoraConfig, get_peft_model

    from grads.models import build_tiny

    model, tok = build_tiny(tied=True)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # non-zero B so that both A and B get a gradient
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    return model, tok


def _samples(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 250, (6 + 5 * i,), generator=g).tolist()
        out.append({"id": f"s{i}", "input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    out.append({"id": "empty", "input_ids": [5, 6, 7], "labels": [-100] * 3})
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_per_sample_lora_grads_equal_per_sample_autograd(lora_tiny, side):
    from grads.data.pool import collate

    model, tok = lora_tiny
    samples = _samples()
    g, n = per_sample_lora_grads(model, **collate(samples, tok.pad_token_id, side))
    params = [p for _, p in lora_parameters(model)]
    assert g.shape == (6, sum(p.numel() for p in params)) and n.tolist()[-1] == 0
    model.eval()
    for i, s in enumerate(samples[:-1]):
        b = collate([s], tok.pad_token_id, "right")
        ref = torch.cat([x.reshape(-1) for x in torch.autograd.grad(model(**b).loss, params)])
        torch.testing.assert_close(g[i], ref, atol=2e-6, rtol=1e-4)
    assert torch.all(g[-1] == 0)
    assert all(p.grad is None for p in params)  # no weight gradient was accumulated


@pytest.mark.parametrize("kind", ["rademacher", "countsketch"])
def test_projection_is_seeded_batch_invariant_and_preserves_angles(kind):
    sizes = [3000, 1200, 800]
    x = torch.randn(64, sum(sizes), generator=torch.Generator().manual_seed(0))
    p = Projector(sizes, 2048, kind, seed=3, block_rows=700)
    a = p.project(x)
    torch.testing.assert_close(
        a[:5], Projector(sizes, 2048, kind, seed=3, block_rows=700).project(x[:5])
    )
    assert not torch.allclose(a, Projector(sizes, 2048, kind, seed=4, block_rows=700).project(x))

    def cos(m):
        u = torch.nn.functional.normalize(m, dim=1)
        return u @ u.T

    y = x[:8] + 0.5 * x[8:16]  # correlated pairs: cosine ~0.9
    err = (cos(p.project(torch.cat([x[:8], y]))) - cos(torch.cat([x[:8], y]))).abs().max()
    assert err < 0.1, err  # JL: error ~ 1/sqrt(d)


def test_adam_preconditioning_matches_less_formula():
    g, m, v = torch.tensor([[0.1, -2.0]]), torch.tensor([0.05, 0.0]), torch.tensor([1e-4, 0.0])
    out = adam_precondition(g, m, v, (0.9, 0.999), 1e-8)
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g**2
    torch.testing.assert_close(out, m2 / torch.sqrt(v2 + 1e-8))


def test_pooled_hidden_weights_positions_and_ignores_padding(tiny):
    from grads.data.pool import collate

    model, tok = tiny
    samples = _samples(3)[:3]
    b = collate(samples, tok.pad_token_id, "right")
    pooled = pooled_hidden(model, b["input_ids"], b["attention_mask"])
    for i, s in enumerate(samples):
        one = collate([s], tok.pad_token_id, "right")
        with torch.no_grad():
            h = model.get_decoder()(input_ids=one["input_ids"]).last_hidden_state[0]
        w = torch.arange(1, h.shape[0] + 1, dtype=torch.float32)
        torch.testing.assert_close(
            pooled[i], (w[:, None] * h).sum(0) / w.sum(), atol=1e-5, rtol=1e-4
        )
    last = pooled_hidden(model, b["input_ids"], b["attention_mask"], "last")
    assert not torch.allclose(last, pooled)


def test_representation_roundtrip_is_memory_mapped(tmp_path):
    rep, _ = planted_target("hidden")
    write_representation(tmp_path / "hidden", rep)
    back = read_representation(tmp_path / "hidden")
    assert isinstance(back.pool, np.memmap) and back.pool.shape == rep.pool.shape
    np.testing.assert_array_equal(back.target, rep.target)
    assert back.target_groups.tolist() == rep.target_groups.tolist()


def test_pass_settings_resolve_by_device_and_reject_typos():
    cpu, gpu = resolve_pass("lora_grads", cuda=False), resolve_pass("lora_grads", cuda=True)
    assert (cpu["projection"], cpu["proj_dim"]) == ("countsketch", 1024)
    assert (gpu["projection"], gpu["proj_dim"]) == ("rademacher", 8192)
    assert resolve_pass("lora_grads", {"proj_dim": 64}, cuda=True)["proj_dim"] == 64
    with pytest.raises(ValueError, match="proj_dimm"):
        resolve_pass("lora_grads", {"proj_dimm": 64})
    with pytest.raises(ValueError, match="pooling"):
        resolve_pass("hidden", {"pooling": "max"})


# ----------------------------------------------------------------------------------------------
# Target sets


@pytest.mark.parametrize("domain", ["medical", "legal", "financial", "synthetic"])
def test_every_domain_has_a_dev_target_set(domain, data_dir):
    cfg = OmegaConf.to_container(compose([f"domain={domain}"]), resolve=True)
    records, summary = load_target(cfg)
    assert summary["name"] == f"{domain}_dev" and 10 <= len(records) <= 60
    assert len(summary["groups"]) >= (1 if domain == "synthetic" else 4)
    assert all(r.response.strip() for r in records)
    if domain == "medical":  # MMLU clinical-knowledge dev questions that reappear in a test file
        assert summary["dropped_eval_overlap"] == 5
    if domain == "synthetic":  # none of the evaluated entities
        from grads.data import synthetic

        names = {r["entity"] for r in synthetic.generate(0, 40, 0)["train"]}
        assert not any(n in r.prompt for r in records for n in names)


def test_target_sets_refuse_test_files(data_dir):
    cfg = OmegaConf.to_container(compose(["domain=financial"]), resolve=True)
    src = dict(cfg["domain"]["target"]["sources"][0])
    src["path"] = src["path"].replace("/dev/", "/test/").replace("_dev.csv", "_test.csv")
    cfg["domain"]["target"]["sources"] = [src]
    with pytest.raises(TargetConfigError, match="test split"):
        load_target(cfg)
    del cfg["domain"]["target"]
    with pytest.raises(TargetConfigError, match="domain.target"):
        load_target(cfg)


# ----------------------------------------------------------------------------------------------
# Pipeline: each new selector through the tiny pipeline (warm-up shared)

TINY = [
    "experiment=smoke",
    "model=tiny",
    "logger=none",
    "domain.pool_limit=40",
    "data.max_seq_len=64",
    "trainer.micro_batch_size=8",
    "warmup.max_steps=2",
    "trainer.save_every=1",
    "trainer.clean_checkpoints=false",  # keep the warm-up's optimizer state: LESS's Adam path
    "features.batch_size=8",
    "stages=[warmup,features,select]",
]


def _run(out: Path, overrides: list[str]) -> dict:
    from grads.pipeline import run

    cfg = compose([f"paths.output_dir={out}", *TINY, *overrides])
    cwd = os.getcwd()
    os.chdir(out)
    try:
        return run(cfg)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines")
    return out, {name: _run(out, [f"selector={name}"]) for name in (*NEW, "grads")}


def test_each_new_selector_runs_in_the_tiny_pipeline(pipeline_runs):
    _, runs = pipeline_runs
    for name in NEW:
        m = runs[name]
        assert m["n_selected"] == 10 and m["selection"]["criterion"] == name, name
    keys = {n: m["keys"]["features"] for n, m in runs.items()}
    # A target set / representation pass enters the features key only when a selector asks.
    assert keys["grads_paper"] == keys["grads"]
    assert len({keys["less"], keys["rds"], keys["grads_cover"], keys["grads"]}) == 4
    assert runs["grads"]["cache_hits"][:1] == ["warmup"]  # the warm-up is shared


def test_pipeline_stores_passes_and_uses_the_warmup_adam_state(pipeline_runs):
    _, runs = pipeline_runs
    feats = Path(runs["less"]["artefacts"]["features"])
    info = json.loads((feats / "representations.json").read_text())
    lora = info["lora_grads"]
    assert lora["preconditioning"] == "adam" and lora["adam_state"]["checkpoint"].startswith(
        "step_"
    )
    assert lora["lora_source"] == "warm-up LoRA adapter" and lora["proj_dim"] == 1024
    rep = read_representation(feats / "representations" / "lora_grads")
    assert rep.pool.shape == (40, 1024) and rep.target.shape[0] == info["target"]["n_tokenized"]
    norms = np.linalg.norm(np.asarray(rep.pool), axis=1)
    np.testing.assert_allclose(norms[np.isfinite(norms)], 1.0, atol=1e-5)
    hidden = json.loads(
        (Path(runs["rds"]["artefacts"]["features"]) / "representations.json").read_text()
    )
    assert (
        hidden["hidden"]["pooling"] == "weighted_mean"
        and hidden["target"]["name"] == "synthetic_dev"
    )
    cover = json.loads(
        (Path(runs["grads_cover"]["artefacts"]["features"]) / "representations.json").read_text()
    )
    assert "target" not in cover  # the coverage rule needs no target set
    sel = json.loads((Path(runs["less"]["artefacts"]["select"]) / "selection.json").read_text())
    assert sel["diagnostics"]["representation"]["preconditioning"] == "adam"


def test_adam_state_matches_the_checkpoint(pipeline_runs):
    from grads.features.representations import lora_model

    out, runs = pipeline_runs
    warm = Path(runs["less"]["artefacts"]["warmup"])
    cfg = OmegaConf.to_container(compose([f"paths.output_dir={out}", *TINY]), resolve=True)
    model, _, _ = lora_model(cfg, warm)
    m, v, info = find_adam_state(warm, model)
    state = torch.load(
        next((warm / "checkpoints").rglob("mp_rank_00_model_states.pt")), weights_only=False
    )["optimizer"]["state"]
    first = lora_parameters(model)[0][1]
    torch.testing.assert_close(m[: first.numel()], state[0]["exp_avg"].reshape(-1).float())
    assert m.shape == v.shape == (sum(p.numel() for _, p in lora_parameters(model)),)
    assert info["step"] >= 1 and (v >= 0).all()


def test_targeted_selector_without_a_domain_target_fails_before_training(tmp_path):
    with pytest.raises(TargetConfigError, match="declares none"):
        _run(tmp_path, ["selector=less", "~domain.target"])
    assert not (tmp_path / "cache" / "warmup").exists()


def test_paper_experiments_list_the_new_selectors():
    main = compose(["experiment=paper_main"], return_hydra_config=True)
    abl = compose(["experiment=paper_ablation"], return_hydra_config=True)
    grid = str(main.hydra.sweeper.params.selector).split(",")
    assert {"less", "rds", "grads_paper", "grads_cover"} <= set(grid)
    # the ablation crosses the `grads` rules with the gradient sources; the 2-D joint rules need
    # both sources and are rows of the main table
    params = abl.hydra.sweeper.params
    assert str(params.selector) == "grads" and "stratified" in str(params["selector.rule"])
    assert list(main.features.representations) == ["lora_grads", "hidden"]


def test_dense_projection_pass_is_independent_of_the_buffer(lora_tiny):
    from grads.features.representations import lora_grad_matrix

    model, tok = lora_tiny
    rows = _samples()
    sizes = [p.numel() for _, p in lora_parameters(model)]
    proj = Projector(sizes, 256, "rademacher", seed=1, block_rows=500)
    one, n1 = lora_grad_matrix(model, rows, tok.pad_token_id, proj, 2, buffer_bytes=1)
    all_, n2 = lora_grad_matrix(model, rows, tok.pad_token_id, proj, 2, buffer_bytes=1 << 30)
    np.testing.assert_allclose(one, all_, atol=1e-5)
    assert np.isnan(one[-1]).all() and np.isnan(n1[-1])  # no supervised token: a NaN row
    np.testing.assert_allclose(np.linalg.norm(one[:-1], axis=1), 1.0, atol=1e-5)


def test_full_finetuning_warmup_gets_a_fresh_seeded_lora(tmp_path):
    from grads.features.representations import lora_model
    from grads.models import build_tiny

    model, tok = build_tiny(tied=True)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg = OmegaConf.to_container(compose(["model=tiny", "trainer.mode=full"]), resolve=True)
    a, _, source = lora_model(cfg, tmp_path)
    b, _, _ = lora_model(cfg, tmp_path)
    assert "fresh" in source
    pa, pb = lora_parameters(a), lora_parameters(b)
    assert [n for n, _ in pa] == [n for n, _ in pb]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(pa, pb))  # seeded


def test_real_passes_rank_the_target_cluster_first(lora_tiny, tiny):
    """End to end on the tiny model: three clusters of sequences (disjoint token ranges); the target
    set is fresh members of one cluster; both passes + selectors put that cluster first."""
    from grads.features.representations import hidden_matrix, lora_grad_matrix

    model, tok = lora_tiny
    g = torch.Generator().manual_seed(7)

    def kind(lo: int, n: int, tag: str) -> list[dict]:
        """A cluster: one 16-token pattern per kind, 2 random positions changed per sample."""
        pattern = torch.randint(lo, lo + 30, (16,), generator=torch.Generator().manual_seed(lo))
        out = []
        for i in range(n):
            ids = pattern.clone()
            pos = torch.randperm(16, generator=g)[:2]
            ids[pos] = torch.randint(lo, lo + 30, (2,), generator=g)
            ids = ids.tolist()
            out.append({"id": f"{tag}{i:02d}", "input_ids": ids, "labels": [-100] * 4 + ids[4:]})
        return out

    pool = kind(10, 20, "A") + kind(100, 20, "B") + kind(200, 20, "C")
    target = kind(100, 5, "T")
    sizes = [p.numel() for _, p in lora_parameters(model)]
    proj = Projector(sizes, 512, "countsketch", seed=0)
    pad = tok.pad_token_id
    grads_pool, _ = lora_grad_matrix(model, pool, pad, proj)
    grads_tgt, _ = lora_grad_matrix(model, target, pad, proj)
    hid_pool, hid_tgt = hidden_matrix(tiny[0], pool, pad), hidden_matrix(tiny[0], target, pad)
    ids = np.array([r["id"] for r in pool], dtype=object)
    tids = np.array([r["id"] for r in target], dtype=object)
    groups = np.array(["task"] * 5, dtype=object)
    table = table_for(ids, seed=2)
    reps = {
        "lora_grads": Representation("lora_grads", ids, grads_pool, tids, grads_tgt, groups),
        "hidden": Representation("hidden", ids, hid_pool, tids, hid_tgt, groups),
    }
    for sel in (LessSelector(), RDSSelector()):
        out = sel.select(table, "n15", 0, reps)  # most of the 20-sample cluster
        assert all(i.startswith("B") for i in out.ids), (sel.name, out.ids)


def test_a_stopped_representation_pass_resumes_from_its_chunks(pipeline_runs, monkeypatch, caplog):
    """Both passes of LESS and RDS+ in chunks of 16 of the 40-sample pool: a crash in the LoRA
    pass's second chunk keeps the first; the next attempt computes only the rest, gives the rows of
    a one-chunk pass (within float rounding: other batches, other padding) and removes the chunks;
    an attempt stopped after a pass was stored reuses it without computing it again."""
    import grads.features.representations as reps
    from grads.data.pool import load_pool
    from grads.models import load_model
    from grads.pipeline import resolve_features_cfg

    out, runs = pipeline_runs
    warm = Path(runs["less"]["artefacts"]["warmup"])
    raw = compose([f"paths.output_dir={out}", *TINY, "selector=less"])
    cfg = OmegaConf.to_container(raw, resolve=True)
    cfg = resolve_features_cfg(cfg)
    cfg["features"]["representations"] = ["lora_grads", "hidden"]
    cfg["features"]["hidden"] = resolve_pass("hidden")
    pool = load_pool(cfg, load_model(cfg["model"])[1])
    one = reps.run_passes({**cfg, "features": {**cfg["features"], "chunk_size": 100}}, warm, pool,
                          out / "one")  # fmt: skip
    assert one["lora_grads"]["n_resumed"] == 0 and not (out / "one" / REP_CHUNK_DIR).exists()
    chunked = {**cfg, "features": {**cfg["features"], "chunk_size": 16}}

    real, calls, crash = reps.lora_grad_matrix, [], [True]

    def crash_in_second(model, samples, *args, **kw):
        calls.append(len(samples))
        if crash[0] and len(calls) == 2:
            raise RuntimeError("killed")
        return real(model, samples, *args, **kw)

    monkeypatch.setattr(reps, "lora_grad_matrix", crash_in_second)
    work = out / "attempt"
    with pytest.raises(RuntimeError, match="killed"):
        reps.run_passes(chunked, warm, pool, work)
    assert sorted(p.name for p in (work / REP_CHUNK_DIR / "lora_grads").iterdir()) == [
        "000000000000.npz"
    ]
    from grads.cache import RESUMABLE

    assert REP_CHUNK_DIR in RESUMABLE  # a failed attempt with saved chunks is kept

    calls.clear()
    crash[0] = False
    with caplog.at_level("INFO"):
        info = reps.run_passes(chunked, warm, pool, work)
    assert calls[:2] == [16, 8]  # pool chunks 2 and 3 (then the target set)
    assert info["lora_grads"]["n_resumed"] == 16 and info["hidden"]["n_resumed"] == 0
    assert not (work / REP_CHUNK_DIR).exists()
    for name in ("lora_grads", "hidden"):
        got = read_representation(work / "representations" / name)
        want = read_representation(out / "one" / "representations" / name)
        assert got.pool_ids.tolist() == want.pool_ids.tolist()
        np.testing.assert_allclose(got.pool, want.pool, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.isnan(got.pool), np.isnan(want.pool))

    def never(*args, **kw):
        raise AssertionError("a stored pass was computed again")

    monkeypatch.setattr(reps, "lora_grad_matrix", never)
    monkeypatch.setattr(reps, "hidden_matrix", never)
    caplog.clear()
    with caplog.at_level("INFO"):
        again = reps.run_passes(chunked, warm, pool, work)
    assert caplog.text.count("reusing the interrupted attempt's finished pass") == 2
    assert again["lora_grads"] == info["lora_grads"] and again["hidden"] == info["hidden"]
