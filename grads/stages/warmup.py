"""The warm-up stage: the paper's preliminary epoch over the whole pool (:mod:`grads.training`)."""

from __future__ import annotations

from pathlib import Path

from grads.stages.base import Job, StageBase, train_stage


class Warmup(StageBase):
    """Train on the pool (or ``warmup.fraction`` of it) with ``warmup.seed``; export a merged model."""

    name = "warmup"
    reads = None

    def run(self, job: Job, work: Path) -> dict:
        cfg = job.cfg
        seed = cfg["warmup"].get("seed", cfg["seed"])
        return train_stage({**cfg, "seed": int(seed)}, "warmup", work, None, job.tracker)
