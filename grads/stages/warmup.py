"""The warm-up stage: the paper's preliminary epoch over the whole pool (:mod:`grads.training`)."""

from __future__ import annotations

from pathlib import Path

from grads.identity import COMMON_SUMMARY, StageSpec, data_identity, pool_identity, train_identity
from grads.models import model_identity
from grads.stages.base import Job, StageBase, train_stage

# What the stage's cache key hashes (see grads.identity).
SPEC = StageSpec(
    "warmup",
    (),
    {
        "model": lambda cfg, fp: model_identity(cfg["model"], fp),
        "pool": pool_identity,
        "data": lambda cfg, fp: data_identity(cfg),
        "trainer": lambda cfg, fp: train_identity(cfg, "warmup"),
        # features.source=warmup makes the warm-up also record the features table
        "features_source": lambda cfg, fp: (cfg.get("features") or {}).get("source", "pass"),
    },
    (*COMMON_SUMMARY, "trainer.mode", "warmup.epochs", "warmup.max_steps", "warmup.seed"),
)


class Warmup(StageBase):
    """Train on the pool (or ``warmup.fraction`` of it) with ``warmup.seed``; export a merged model."""

    name = "warmup"
    reads = None
    spec = SPEC

    def run(self, job: Job, work: Path) -> dict:
        cfg = job.cfg
        seed = cfg["warmup"].get("seed", cfg["seed"])
        return train_stage({**cfg, "seed": int(seed)}, "warmup", work, None, job.tracker)
