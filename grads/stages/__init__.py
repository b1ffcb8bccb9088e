"""The pipeline's stages as small objects, one module each, in run order.

Each stage owns its cache identity (``stage.spec``, a :class:`grads.identity.StageSpec`) and its
``run(job, work)``; :func:`grads.pipeline.run` loops over :data:`STAGES`.
"""

from __future__ import annotations

from grads.stages.base import Job, Stage, StageInterrupted
from grads.stages.evaluate import Evaluate
from grads.stages.features import Features
from grads.stages.finetune import Finetune
from grads.stages.select import Select
from grads.stages.warmup import Warmup

STAGES: tuple[Stage, ...] = (Warmup(), Features(), Select(), Finetune(), Evaluate())
# What each stage's cache key hashes, by stage name.
SPECS = {stage.name: stage.spec for stage in STAGES}

__all__ = [
    "SPECS",
    "STAGES",
    "Evaluate",
    "Features",
    "Finetune",
    "Job",
    "Select",
    "Stage",
    "StageInterrupted",
    "Warmup",
]
