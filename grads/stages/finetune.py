"""The fine-tune stage: from the base model again, on the selected ids (:mod:`grads.training`)."""

from __future__ import annotations

from pathlib import Path

from grads.identity import COMMON_SUMMARY, StageSpec, data_identity, train_identity
from grads.io import read_jsonl
from grads.models import model_identity
from grads.stages.base import Job, StageBase, train_stage

# What the stage's cache key hashes (see grads.identity).
SPEC = StageSpec(
    "finetune",
    ("select",),
    {
        "model": lambda cfg, fp: model_identity(cfg["model"], fp),
        "data": lambda cfg, fp: data_identity(cfg),
        "trainer": lambda cfg, fp: train_identity(cfg, "finetune"),
    },
    (*COMMON_SUMMARY, "selector.name", "budget.name", "seed", "trainer.mode", "finetune.epochs"),
)


class Finetune(StageBase):
    """Train on ``selection.jsonl``'s ids."""

    name = "finetune"
    reads = "select"
    spec = SPEC

    def run(self, job: Job, work: Path) -> dict:
        ids = [r["id"] for r in read_jsonl(self.input_dir(job) / "selection.jsonl")]
        return train_stage(job.cfg, "finetune", work, ids, job.tracker)
