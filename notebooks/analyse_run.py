# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Analyse one grads run: gradient features and the selected subset
#
# Point `RUN_DIR` at a run folder (the one holding `metrics.json`), or set the environment variable
# `GRADS_RUN_DIR`. The notebook reads the run's cached `features.parquet` and `selection.jsonl`,
# shows how the two gradient norms are distributed over the pool, where the selected samples sit,
# and how the selection relates to loss and length.
#
# Open as a notebook with `jupytext --to ipynb notebooks/analyse_run.py` (or the jupytext plugin).

# %%
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from grads.plots import draw_gradient_plane, histogram_bins

RUN_DIR = os.environ.get("GRADS_RUN_DIR")
if RUN_DIR is None:  # newest run under outputs/
    candidates = sorted(Path("outputs").rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    RUN_DIR = str(candidates[-1].parent) if candidates else None
assert RUN_DIR is not None, "set GRADS_RUN_DIR to a run folder with metrics.json"
metrics = json.loads((Path(RUN_DIR) / "metrics.json").read_text())
art = metrics["artefacts"]
print(
    {
        k: metrics.get(k)
        for k in (
            "domain",
            "selector",
            "budget",
            "n_pool",
            "n_selected",
            "domain_acc",
            "general_acc",
            "forgetting",
        )
    }
)

# %%
features = pd.read_parquet(Path(art["features"]) / "features.parquet")
selection = pd.read_json(Path(art["select"]) / "selection.jsonl", lines=True)
features["selected"] = features["id"].isin(set(selection["id"]))
features.describe().T

# %% [markdown]
# ## The two gradient norms
# Embedding vs LM-head gradient norm per sample (log scale), selected samples highlighted.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
ok = np.isfinite(features["embed"]) & np.isfinite(features["lm_head"])
f = features[ok]
draw_gradient_plane(axes[0], f["embed"], f["lm_head"], f["selected"])  # as in the export's plot
for ax, col in zip(axes[1:], ["embed", "lm_head"]):
    bins = np.logspace(np.log10(f[col].min()), np.log10(f[col].max()), histogram_bins(len(f)) + 1)
    ax.hist(f[col], bins=bins, alpha=0.5, label="pool", density=True)
    ax.hist(f.loc[f.selected, col], bins=bins, alpha=0.7, label="selected", density=True)
    ax.set_xscale("log")
    ax.set_xlabel(col)
    ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Loss and length of the selected samples

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, col in zip(axes, ["loss", "n_tokens"]):
    bins = histogram_bins(len(f))
    ax.hist(f[col], bins=bins, alpha=0.5, density=True, label="pool")
    ax.hist(f.loc[f.selected, col], bins=bins, alpha=0.7, density=True, label="selected")
    ax.set_xlabel(col)
    ax.legend()
fig.tight_layout()
summary = f.groupby("selected")[["loss", "n_tokens", "embed", "lm_head"]].median()
summary

# %% [markdown]
# ## The selection plot written by the select stage, and the export's composition summary

# %%
from IPython.display import Image, display  # noqa: E402

png = Path(art["select"]) / "selection.png"
if png.exists():
    display(Image(filename=str(png)))
exported = metrics.get("export") or {}  # domain=custom runs and grads-select (grads.export)
for key in ("plot", "composition_plot"):
    if exported.get(key) and Path(exported[key]).exists():
        display(Image(filename=exported[key]))
for line in exported.get("warnings") or []:
    print("warning:", line)
