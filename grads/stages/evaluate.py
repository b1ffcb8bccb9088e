"""The evaluate stage: the tuned model against the base model (:mod:`grads.evaluation`)."""

from __future__ import annotations

from pathlib import Path

from grads.identity import COMMON_SUMMARY, StageSpec, eval_identity
from grads.stages.base import Job, StageBase, load_trained


def evaluate(cfg: dict, work: Path, finetune_dir: Path) -> dict:
    """Evaluate the model in ``finetune_dir``; both models run where the stage's device is."""
    from grads.dist import compute_device
    from grads.evaluation import run_evaluate
    from grads.models import load_model

    # lm-eval's HFLM runs an in-memory model where it lies, so both models go to the GPU first.
    device = compute_device()
    model, tokenizer = load_trained(cfg, finetune_dir)
    model.to(device)

    def load_base():
        base, base_tokenizer = load_model(cfg["model"], cache_dir=cfg["paths"]["model_dir"])
        return base.to(device), base_tokenizer

    out = run_evaluate(cfg, model, tokenizer, str(work), load_base) or {}
    return {**out, "device": str(device)}


# What the stage's cache key hashes (see grads.identity).
SPEC = StageSpec(
    "evaluate",
    ("finetune",),
    {"evaluate": eval_identity},
    (*COMMON_SUMMARY, "selector.name", "budget.name", "seed", "eval.name"),
)


class Evaluate(StageBase):
    """Domain and general suites, continuous metrics and KL, with the base model's scores."""

    name = "evaluate"
    reads = "finetune"
    spec = SPEC

    def run(self, job: Job, work: Path) -> dict:
        return evaluate(job.cfg, work, self.input_dir(job))
