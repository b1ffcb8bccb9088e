"""Every committed table regenerates byte-identically from its committed CSV (RESULTS.md, "Generated
tables"; the pool-scale collections of ``results/poolscale/`` too): the text outputs (Markdown, LaTeX, CSV) of ``scripts/make_tables.py --from-csv``, written to
a temporary folder and compared with the files in ``results/``. Plots are left out (their bytes follow
the matplotlib version)."""

from __future__ import annotations

import pytest

from grads.paper.tables import main as make_tables
from tests.conftest import REPO

RESULTS = REPO / "results"


def _collections(folder: str) -> list[str]:
    """The collections under ``results/<folder>``: sub-folders holding ``<name>/<name>.csv``."""
    root = RESULTS / folder
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / f"{p.name}.csv").exists())


DOMAINS = _collections("tables")  # the 1,000-sample pools, merged into tables_all
POOLSCALE = _collections("poolscale")  # the whole financial pool and its bridge (not merged)
CASES = [
    *[([f"tables/{d}/{d}.csv"], "--title", d, f"tables/{d}") for d in DOMAINS],
    ([f"tables/{d}/{d}.csv" for d in DOMAINS], "--title", "all", "tables_all"),
    (["cpu_synthetic/results.csv"], None, None, "cpu_synthetic"),
    *[([f"poolscale/{d}/{d}.csv"], "--title", d, f"poolscale/{d}") for d in POOLSCALE],
]


@pytest.mark.parametrize("csvs,flag,title,folder", CASES, ids=[c[3] for c in CASES])
def test_committed_tables_regenerate_byte_identically(tmp_path, csvs, flag, title, folder):
    argv = ["--from-csv", *[str(RESULTS / c) for c in csvs], "--out", str(tmp_path)]
    make_tables(argv + ([flag, title] if flag else []))
    made = sorted(p for p in tmp_path.iterdir() if p.suffix in {".md", ".tex", ".csv"})
    assert made, "make_tables wrote no table"
    for p in made:
        committed = RESULTS / folder / p.name
        assert committed.exists(), f"{p.name} is generated but not committed in results/{folder}"
        assert p.read_bytes() == committed.read_bytes(), f"results/{folder}/{p.name} differs"


POOL_SIZE = RESULTS / "poolscale" / "financial_pool" / "pool_size.md"


@pytest.mark.skipif(not POOL_SIZE.is_file(), reason="no whole-pool rows collected yet")
def test_the_pool_size_comparison_regenerates_from_the_committed_csvs(tmp_path):
    from grads.paper.poolscale_views import pool_size_report

    out = pool_size_report(RESULTS, tmp_path / "pool_size.md")
    assert out is not None and out.read_bytes() == POOL_SIZE.read_bytes()


STABILITY = RESULTS / "poolscale" / "financial_pool" / "stability.json"


@pytest.mark.skipif(not STABILITY.is_file(), reason="no stability runs collected yet")
def test_the_stability_table_regenerates_from_its_json():
    from grads.io import read_json
    from grads.paper.poolscale_views import stability_table

    made = stability_table(read_json(STABILITY))
    assert made == STABILITY.with_suffix(".md").read_text()


VIEWS = [
    f"{folder}/{name}"
    for folder, names in (("tables", DOMAINS), ("poolscale", POOLSCALE))
    for name in names
    if (RESULTS / folder / name / "selections").is_dir()
    and (RESULTS / folder / name / "pool_features.csv").is_file()
]


@pytest.mark.parametrize("folder", VIEWS)
def test_committed_subset_views_regenerate_from_selections_and_pool_features(
    tmp_path, folder, monkeypatch
):
    """sources_, overlap_ and profile_<domain>.md from the committed selections and pool CSV (the
    plots beside them are not compared, so not written)."""
    import shutil

    from matplotlib.figure import Figure

    from grads.paper.views import selection_views

    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: None)

    src = RESULTS / folder
    shutil.copytree(src / "selections", tmp_path / "selections")
    shutil.copy(src / "pool_features.csv", tmp_path / "pool_features.csv")
    domain = "financial" if folder.startswith("poolscale/") else folder.split("/")[1]
    selection_views(domain, tmp_path)
    made = sorted(tmp_path.glob("*.md"))
    assert made
    for p in made:
        assert p.read_bytes() == (src / p.name).read_bytes(), f"results/{folder}/{p.name} differs"
