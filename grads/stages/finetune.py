"""The fine-tune stage: from the base model again, on the selected ids (:mod:`grads.training`)."""

from __future__ import annotations

from pathlib import Path

from grads.io import read_jsonl
from grads.stages.base import Job, StageBase, train_stage


class Finetune(StageBase):
    """Train on ``selection.jsonl``'s ids."""

    name = "finetune"
    reads = "select"

    def run(self, job: Job, work: Path) -> dict:
        ids = [r["id"] for r in read_jsonl(self.input_dir(job) / "selection.jsonl")]
        return train_stage(job.cfg, "finetune", work, ids, job.tracker)
