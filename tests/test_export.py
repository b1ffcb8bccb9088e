"""The export tells what was picked: scores of the whole pool, the subset's composition, TRL files.

One tiny-model ``grads-select`` run on a generated custom pool of three record templates (20 each),
where the ``length`` selector fills a 10 % budget from the template with the long answers, so the
composition must flag the concentration. The other tests drive the export from the select stage's
own function on a features table written here (no model), to reach the rows a selector cannot
score, chat records and the summary's thresholds.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import compose

COUNTRIES = ["Avalon", "Borduria", "Cascadia", "Dorne", "Elbonia", "Freedonia", "Genovia"]
WORDS = ["river", "stone", "wind", "lamp", "cloud", "tree", "bird", "field", "snow", "rain"]
PER_TEMPLATE = 20
SYSTEM = "Answer briefly."


def template_rows(per_template: int = PER_TEMPLATE, seed: int = 0) -> list[dict]:
    """Alpaca-style rows from three templates: capitals, sums and summaries (long answers)."""
    rng = random.Random(seed)
    rows = []
    for i in range(per_template):
        country = f"{COUNTRIES[i % len(COUNTRIES)]} {i}"
        rows.append(
            {
                "instruction": f"What is the capital of {country}?",
                "input": "",
                "output": f"Port {i}.",
            }
        )
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)})
        text = " ".join(rng.choice(WORDS) for _ in range(25))
        rows.append(
            {
                "instruction": "Summarise the following text in one sentence.",
                "input": text,
                "output": f"A story of {text}.",
            }
        )
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


TEMPLATES = ["domain.prompt='{instruction}\\n{input}'", "domain.response='{output}'"]
TINY = [
    "model=tiny",
    "logger=none",
    "data.max_seq_len=96",
    "trainer.micro_batch_size=8",
    "warmup.max_steps=2",
    "features.batch_size=8",
]


@pytest.fixture(scope="module")
def length_run(tmp_path_factory):
    """``grads-select`` with ``selector=length budget=p10`` and every export format."""
    from grads.cli.select import select

    tmp = tmp_path_factory.mktemp("export_run")
    rows = template_rows()
    write_jsonl(tmp / "pool.jsonl", rows)
    cfg = compose(
        [
            "domain=custom",
            f"domain.path={tmp / 'pool.jsonl'}",
            *TEMPLATES,
            *TINY,
            "selector=length",
            "budget=p10",
            f"data.system_prompt='{SYSTEM}'",
            f"paths.output_dir={tmp / 'out'}",
            f"export.dir={tmp / 'subset'}",
            "export.format=[datasets,trl,messages]",
        ]
    )
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        metrics = select(cfg)
    finally:
        os.chdir(cwd)
    return tmp / "subset", metrics, rows


def test_scores_parquet_has_every_pool_sample_and_the_selection(length_run):
    out, metrics, rows = length_run
    scores = pd.read_parquet(out / "scores.parquet")
    features = pd.read_parquet(Path(metrics["artefacts"]["features"]) / "features.parquet")
    assert len(scores) == len(rows) == len(features) == metrics["n_pool"]
    assert scores["id"].tolist() == features["id"].tolist()  # one row per sample, pool order
    assert set(features.columns) <= set(scores.columns)
    assert {"score", "rank", "selected", "template", "source"} <= set(scores.columns)
    selected = read_jsonl(out / "selected.jsonl")
    assert len(selected) == metrics["n_selected"] == 6
    picked = scores[scores["selected"]].sort_values("rank")
    assert picked["id"].tolist() == [r["id"] for r in selected]
    assert picked["rank"].tolist() == list(range(6))
    assert picked["score"].tolist() == [r["score"] for r in selected]
    # length scores by supervised tokens: the rest of the pool ranks after, by the same score
    rest = scores[~scores["selected"]].sort_values("rank")
    assert rest["rank"].tolist() == list(range(6, len(rows)))
    assert rest["score"].max() <= picked["score"].min()
    assert (scores["score"] == scores["n_tokens"]).all()


def test_export_json_reports_the_concentrated_template(length_run):
    out, metrics, _ = length_run
    manifest = json.loads((out / "export.json").read_text())
    assert metrics["export"]["composition"] == manifest["composition"]
    tpl = manifest["composition"]["groups"]["template"]
    assert tpl["groups"] == 3 and sorted(tpl["pool"].values()) == [PER_TEMPLATE] * 3
    assert tpl["subset"] == {"summarise the following text in one ...": 6}
    assert tpl["total_variation"] == pytest.approx(2 / 3, abs=1e-3)
    assert tpl["concentrated"] and tpl["random_p95"] < tpl["total_variation"]
    (warning,) = manifest["warnings"]
    assert "concentrated by template" in warning and "6 of 6" in warning
    length = manifest["composition"]["length"]["supervised_tokens"]
    assert length["subset"]["q50"] > length["pool"]["q90"] - 1e-9
    assert length["subset_above_pool_median"] == 1.0
    assert manifest["composition"]["answers"] is None  # free-text answers: no classes
    assert (out / "composition.png").stat().st_size > 5000
    assert (out / "selection.png").stat().st_size > 5000


def test_trl_and_messages_files_read_back_with_the_trained_rendering(length_run):
    from datasets import load_dataset, load_from_disk

    out, _, rows = length_run
    selected = read_jsonl(out / "selected.jsonl")
    trl = load_dataset("json", data_files=str(out / "trl.jsonl"), split="train")
    assert trl.num_rows == len(selected) and trl.column_names == ["prompt", "completion"]
    for sel, rec in zip(selected, trl):
        user = f"{sel['instruction']}\n{sel['input']}".strip()  # the run's prompt template
        assert rec["prompt"] == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
        ]
        assert rec["completion"] == [{"role": "assistant", "content": sel["output"]}]
    msgs = load_dataset("json", data_files=str(out / "messages.jsonl"), split="train")
    assert msgs.column_names == ["messages"]
    assert [m["messages"] for m in msgs] == [r["prompt"] + r["completion"] for r in trl]
    for name in ("selected", "trl", "messages"):
        assert load_from_disk(str(out / name)).num_rows == len(selected)
    ds = load_from_disk(str(out / "selected"))
    assert ds["id"] == [r["id"] for r in selected] and ds["rank"] == list(range(len(selected)))
    originals = {(r["instruction"], r["input"]): r for r in rows}
    assert all(originals[(r["instruction"], r["input"])]["output"] == r["output"] for r in ds)


# --------------------------------------------------------------------------------------------------
# Without a model: the select stage's own function on a features table written here
# --------------------------------------------------------------------------------------------------
def _cfg(pool: Path, *overrides: str) -> dict:
    cfg = compose(["domain=custom", f"domain.path={pool}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def _features(records, tmp: Path, nan_every: int = 0) -> Path:
    """A features table over the records' ids; every ``nan_every``-th row has NaN features."""
    rng = np.random.default_rng(0)
    n = len(records)
    table = pd.DataFrame(
        {
            "id": [r.id for r in records],
            "loss": rng.uniform(1, 3, n),
            "n_tokens": [len(r.response.split()) + 1 for r in records],
            "embed": rng.lognormal(0, 0.5, n),
            "lm_head": rng.lognormal(0, 0.5, n),
        }
    )
    if nan_every:
        table.loc[::nan_every, ["loss", "embed", "lm_head"]] = np.nan
    path = tmp / "features" / "features.parquet"
    path.parent.mkdir(parents=True)
    table.to_parquet(path)
    return path


def _select_and_export(cfg: dict, records, tmp: Path, nan_every: int = 0) -> dict:
    from grads.export import export_selection
    from grads.selectors.stage import run_select

    features = _features(records, tmp, nan_every)
    run_select(cfg["selector"], cfg["budget"], features, tmp / "select", int(cfg["seed"]))
    return export_selection(cfg, tmp / "select", tmp / "export")


def test_unscorable_samples_keep_a_row_with_null_score_and_rank(tmp_path):
    from grads.data.pool import load_records

    pool = write_jsonl(tmp_path / "pool.jsonl", template_rows())
    cfg = _cfg(pool, *TEMPLATES, "selector=gradnorm", "budget=p25")
    records, _ = load_records(cfg["domain"], cfg["data"])
    manifest = _select_and_export(cfg, records, tmp_path, nan_every=5)
    scores = pd.read_parquet(tmp_path / "export" / "scores.parquet")
    assert len(scores) == len(records) == 60
    unscored = scores["loss"].isna()
    assert unscored.sum() == 12
    assert scores.loc[unscored, "score"].isna().all() and scores.loc[unscored, "rank"].isna().all()
    assert not scores.loc[unscored, "selected"].any()
    scored = scores[~unscored].sort_values("rank")
    assert scored["rank"].tolist() == list(range(48))  # the valid pool, ranked without gaps
    expected = np.hypot(scored["embed"], scored["lm_head"])  # gradnorm's score
    assert np.allclose(scored["score"], expected)
    assert scored["selected"].tolist() == [True] * 12 + [False] * 36  # 25 % of the 48 valid
    picked = read_jsonl(tmp_path / "export" / "selected.jsonl")
    assert scored["id"].tolist()[:12] == [r["id"] for r in picked]
    assert manifest["scores"] == str(tmp_path / "export" / "scores.parquet")
    assert manifest["dataset"] and manifest.get("trl") is None  # default formats


def test_scores_written_a_few_rows_at_a_time_equal_one_batch(tmp_path, monkeypatch):
    """``scores.parquet`` is streamed from the features table's row batches: with batches of 7 rows
    (and the picks found batch by batch) it equals the file written in one batch, ranks stay
    nullable integers, and the plane draws a sample of a set larger than its cap."""
    import grads.export.scores as scores
    from grads.data.pool import load_records
    from grads.plots import draw_gradient_plane, new_figure

    pool = write_jsonl(tmp_path / "pool.jsonl", template_rows())
    cfg = _cfg(pool, *TEMPLATES, "selector=gradnorm", "budget=p25")
    records, _ = load_records(cfg["domain"], cfg["data"])
    _select_and_export(cfg, records, tmp_path / "one", nan_every=5)
    monkeypatch.setattr(scores, "BATCH_ROWS", 7)
    _select_and_export(cfg, records, tmp_path / "many", nan_every=5)
    one = pd.read_parquet(tmp_path / "one" / "export" / "scores.parquet")
    many = pd.read_parquet(tmp_path / "many" / "export" / "scores.parquet")
    assert len(many) == 60 and str(many["rank"].dtype) == "Int64"
    pd.testing.assert_frame_equal(one, many)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "many" / "export" / "scores.parquet").num_row_groups == 9
    fig, (ax,) = new_figure(1)
    chosen = many["selected"].to_numpy()
    assert draw_gradient_plane(ax, many["embed"], many["lm_head"], chosen, max_points=10) == 48
    assert [len(c.get_offsets()) for c in ax.collections] == [10, 10]
    assert "48; 20 drawn" in ax.get_title()


def test_chat_pool_exports_prompt_completion_and_messages(tmp_path):
    from datasets import load_dataset

    from grads.data.pool import load_records

    chats = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Capital of Q{i}?"},
                {"role": "assistant", "content": f"Port B{i}."},
                {"role": "user", "content": f"And of R{i}?"},
                {"role": "assistant", "content": f"Port C{i}."},
            ]
        }
        for i in range(12)
    ]
    pool = write_jsonl(tmp_path / "chat.jsonl", chats)
    cfg = _cfg(pool, "selector=gradnorm", "budget=p25", "export.format=[trl,messages]")
    records, _ = load_records(cfg["domain"], cfg["data"])
    manifest = _select_and_export(cfg, records, tmp_path)
    assert manifest["formats"] == ["jsonl", "trl", "messages"] and manifest["dataset"] is None
    assert not (tmp_path / "export" / "selected").exists()
    picked = read_jsonl(tmp_path / "export" / "selected.jsonl")
    trl = load_dataset("json", data_files=manifest["trl"]["jsonl"], split="train")
    msgs = load_dataset("json", data_files=manifest["messages"]["jsonl"], split="train")
    assert trl.num_rows == msgs.num_rows == len(picked) == 3
    for sel, t, m in zip(picked, trl, msgs):
        turns = sel["messages"]  # the original record: used as it is
        assert m["messages"] == turns
        assert t["prompt"] == turns[:-1] and t["completion"] == turns[-1:]


def test_a_spread_subset_is_not_flagged_and_near_duplicates_are(tmp_path, caplog):
    from grads.data.pool import load_records
    from grads.export.composition import composition, group_labels, near_duplicate_mask

    pool = write_jsonl(tmp_path / "pool.jsonl", template_rows())
    cfg = _cfg(pool, *TEMPLATES)
    records, _ = load_records(cfg["domain"], cfg["data"])
    by_id = {r.id: r for r in records}
    tpl = group_labels(by_id, list(by_id))["template"]
    assert len(set(tpl.values())) == 3
    spread = [i for t in sorted(set(tpl.values())) for i in [j for j in by_id if tpl[j] == t][:2]]
    summary = composition(by_id, list(by_id), spread)
    assert summary["groups"]["template"]["total_variation"] == 0.0
    assert not summary["groups"]["template"]["concentrated"] and summary["warnings"] == []
    assert near_duplicate_mask(
        ["the cat sat on the mat today", "The cat sat on the mat today!", "a dog ran off"]
    ).tolist() == [True, True, False]
    # a subset of near-identical summaries repeats itself, which random pool samples do not
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(30))
    dup_rows = [
        {"instruction": "Summarise.", "input": f"{text} {end}", "output": "A story."}
        for end in ("today", "again", "twice", "north", "south", "later")
    ]
    pool2 = write_jsonl(tmp_path / "pool2.jsonl", template_rows() + dup_rows)
    records2, _ = load_records(_cfg(pool2, *TEMPLATES)["domain"], cfg["data"])
    by_id2 = {r.id: r for r in records2}
    dups = [r.id for r in records2 if r.prompt.startswith("Summarise.\n")]
    assert len(dups) == 6
    with caplog.at_level(logging.WARNING, logger="grads.export.composition"):
        summary2 = composition(by_id2, list(by_id2), dups)
    assert summary2["duplicates"]["subset"]["near"] == 1.0
    assert summary2["duplicates"]["pool_sample"]["near"] < 0.5
    assert any("repeats itself" in w for w in summary2["warnings"])
    assert "repeats itself" in caplog.text


def test_export_format_is_checked_before_anything_runs():
    from grads.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"export.format=.*unknown \['parquet'\]"):
        validate_config(compose(["export.format=[trl,parquet]"]))
    validate_config(compose(["export.format=trl"]))  # a single name is a list of one
    with pytest.raises(ConfigError, match="export.concentration_warning"):
        validate_config(compose(["export.concentration_warning=-1"]))


def test_histogram_bins_follow_the_pool_size():
    from grads.plots import histogram_bins

    assert histogram_bins(60) == 8 and histogram_bins(1000) == 20
    assert histogram_bins(3) == 5 and histogram_bins(10**9) == 150
    assert [histogram_bins(n) for n in (100, 10**4, 10**5)] == sorted(
        histogram_bins(n) for n in (100, 10**4, 10**5)
    )


def test_answer_classes_and_shards_are_axes_of_a_label_pool(tmp_path):
    from grads.data.pool import load_records
    from grads.export.composition import composition

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in ("a", "b"):
        rows = [
            {
                "question": f"Is clause {shard}{i} an exclusivity clause?",
                "answer": "Yes" if i % 4 else "No",
            }
            for i in range(20)
        ]
        write_jsonl(folder / f"{shard}.jsonl", rows)
    cfg = _cfg(folder, "domain.prompt=question", "domain.response=answer")
    records, _ = load_records(cfg["domain"], cfg["data"])
    by_id = {r.id: r for r in records}
    picked = [r.id for r in records if r.response == "No"]  # shard a's and shard b's "No"s
    summary = composition(by_id, list(by_id), picked)
    answers = summary["answers"]
    assert answers["pool"] == {"Yes": 30, "No": 10} and answers["subset"] == {"No": 10}
    assert answers["concentrated"] and answers["total_variation"] == pytest.approx(0.75)
    files = summary["groups"]["file"]
    assert sorted(files["pool"].values()) == [20, 20] and not files["concentrated"]
    assert any("concentrated by answer" in w for w in summary["warnings"])
