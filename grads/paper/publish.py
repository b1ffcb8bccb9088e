"""Publish a domain's runs into ``results/``: tables, selections, the pool's features, the views.

:func:`collect_domain` is what ``run_tables.py`` does after every phase (and ``--collect-only``):
the domain's tables (:func:`grads.paper.tables.main`), the selected ids of every run
(``selections/``), the pool's features (``pool_features.csv``), the subset views
(:mod:`grads.paper.views`), the merge of the collected domains into ``tables_all/``
(:func:`merge_domains`) and the links to them in RESULTS.md (:mod:`grads.paper.results_md`).
"""

from __future__ import annotations

from pathlib import Path

from grads.constants import REPO_ROOT
from grads.io import read_json, read_jsonl, write_jsonl, write_text
from grads.paper.protocol import domains
from grads.paper.results_md import update_results_md, verdict_lines
from grads.paper.tables import main as report_main
from grads.paper.views import PROFILE, selection_views


def collect_domain(domain: str, runs_dir: Path, results_dir: Path) -> None:
    """Tables + per-item results + selected ids of every finished run of the domain."""
    if not any(runs_dir.rglob("metrics.json")):
        print(f"nothing to collect under {runs_dir}")
        return
    report_main([str(runs_dir), "--out", str(results_dir), "--title", domain])
    sources = publish_selections(runs_dir, results_dir / "selections")
    if sources:
        publish_pool_features(runs_dir, results_dir / "pool_features.csv", sources)
        selection_views(domain, results_dir, sources)
    if update_results_md(REPO_ROOT / "RESULTS.md", domain, results_dir):
        print(f"RESULTS.md: links to the tables of {domain} updated")
    merge_domains(results_dir.parent)


def merge_domains(tables_dir: Path, results_md: Path = REPO_ROOT / "RESULTS.md") -> None:
    """Merge the committed per-domain CSVs (``<tables_dir>/<domain>/<domain>.csv``) into
    ``<tables_dir>/../tables_all/`` and link it from RESULTS.md's ``all`` block with its verdicts
    (Table 2's winner across domains and the default decision, which decide the default)."""
    csvs = sorted(p for d in domains() if (p := tables_dir / d / f"{d}.csv").is_file())
    if not csvs:
        return
    out = tables_dir.parent / "tables_all"  # outside tables/, so tables/*/*.csv stays the domains
    report_main(["--from-csv", *map(str, csvs), "--out", str(out), "--title", "all"])
    summary = verdict_lines(out / "all.md") or ["No ablation runs yet."]
    if update_results_md(results_md, "all", out, summary):
        print("RESULTS.md: links to the tables across domains updated")


def publish_selections(runs_dir: Path, sel_dir: Path) -> dict[str, str]:
    """Copy every run's ``selection.jsonl`` (id, rank, score) with each id's source to ``sel_dir``
    as ``<selector>_<budget>_seed<k>.jsonl``; returns ``{id: source}`` of the pool."""
    sel_dir.mkdir(parents=True, exist_ok=True)
    sources: dict[str, str] = {}
    for mfile in sorted(runs_dir.rglob("metrics.json")):
        m = read_json(mfile)
        src = Path(m.get("artefacts", {}).get("select", "")) / "selection.jsonl"
        if not src.is_file():
            continue
        if not sources:  # the pool is the same for every run of the domain
            sources = pool_sources(mfile.parent / "config_resolved.yaml")
        rows = read_jsonl(src)
        name = f"{m['selector']}_{m['budget']}_seed{m['seed']}.jsonl"
        write_jsonl(sel_dir / name, [{**r, "source": sources.get(r["id"])} for r in rows])
    return sources


def publish_pool_features(
    runs_dir: Path, out_file: Path, sources: dict[str, str], sweep: str = "main_p5"
) -> bool:
    """The domain's features table as the warm-up model sees the pool (that of the runs under
    ``runs_dir / sweep``, shared by every selector): id, source, the answer on a label-like pool
    (:func:`pool_answers`) and the :data:`PROFILE` columns, a small CSV beside the selections so the
    subset profiles regenerate without the cache. False if no run there has one."""
    import pandas as pd

    for mfile in sorted((runs_dir / sweep).rglob("metrics.json")):
        f = Path(read_json(mfile).get("artefacts", {}).get("features", "")) / "features.parquet"
        if f.is_file():
            df = pd.read_parquet(f, columns=["id", *PROFILE])
            df.insert(1, "source", df["id"].map(sources))
            answers = pool_answers(mfile.parent / "config_resolved.yaml")
            if answers:  # a label-like pool: which answer each subset holds (subset_profile)
                df.insert(2, "answer", df["id"].map(answers))
            write_text(out_file, df.to_csv(index=False, float_format="%.5g"))
            return True
    return False


def pool_sources(config_file: Path) -> dict[str, str]:
    """``{record id: source name}`` of a run's pool (ids are content hashes of the records, so
    ``grads.data.pool.load_records`` on the same data gives the same ids: that is how to train on them)."""
    from omegaconf import OmegaConf

    from grads.data.pool import load_records

    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    records, _ = load_records(cfg["domain"], cfg["data"])
    return {r.id: r.source for r in records}


def pool_answers(config_file: Path) -> dict[str, str] | None:
    """``{record id: answer}`` of a run's pool when its answers are labels (at most
    ``grads.selectors.balance.MAX_ANSWER_CLASSES`` distinct: legal's Yes/No), else ``None``."""
    from omegaconf import OmegaConf

    from grads.selectors.balance import answer_labels

    if not config_file.is_file():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    if "domain" not in cfg:  # not a pipeline run's config
        return None
    return answer_labels(cfg)
