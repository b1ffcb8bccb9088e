"""The select stage: the job's selector over the features table (:mod:`grads.selectors.stage`)."""

from __future__ import annotations

from pathlib import Path

from grads.hashing import without
from grads.identity import COMMON_SUMMARY, StageSpec, balance_part, budget_part
from grads.stages.base import Job, StageBase

# What the stage's cache key hashes (see grads.identity).
SPEC = StageSpec(
    "select",
    ("features",),
    {
        "selector": lambda cfg, fp: without(cfg.get("selector"), ()),
        "budget": budget_part,
        "seed": lambda cfg, fp: cfg.get("seed"),
        "balance": balance_part,
    },
    (*COMMON_SUMMARY, "selector.name", "budget.name", "seed", "select.balance"),
)


class Select(StageBase):
    """Rank the pool with the job's selector (built once per job) and keep the budget (per class
    when ``select.balance`` is set)."""

    name = "select"
    reads = "features"
    spec = SPEC

    def run(self, job: Job, work: Path) -> dict:
        from hydra.utils import instantiate

        from grads.selectors.balance import answer_labels, balance_of
        from grads.selectors.stage import run_select

        features = self.input_dir(job) / "features.parquet"
        budget = instantiate(job.cfg["budget"])
        by = balance_of(job.cfg)
        balance = (by, job.labels) if job.labels is not None else None  # select.balance
        # on a label-like pool, the subset's answers vs the pool's (selection.json, a warning)
        answers = job.labels if by == "answer" else answer_labels(job.cfg)
        summary = run_select(
            job.selector, budget, str(features), str(work), int(job.cfg["seed"]), balance, answers
        )
        return summary or {}
