"""The select stage: the job's selector over the features table (:mod:`grads.selectors.stage`)."""

from __future__ import annotations

from pathlib import Path

from grads.stages.base import Job, StageBase


class Select(StageBase):
    """Rank the pool with the job's selector (built once per job) and keep the budget (per class
    when ``select.balance`` is set)."""

    name = "select"
    reads = "features"

    def run(self, job: Job, work: Path) -> dict:
        from hydra.utils import instantiate

        from grads.selectors.balance import balance_of
        from grads.selectors.stage import run_select

        features = self.input_dir(job) / "features.parquet"
        budget = instantiate(job.cfg["budget"])
        seed = int(job.cfg["seed"])
        if job.labels is not None:  # select.balance (grads.selectors.balance)
            by = balance_of(job.cfg)
            return run_select(
                job.selector, budget, str(features), str(work), seed, (by, job.labels)
            )
        return run_select(job.selector, budget, str(features), str(work), seed) or {}
