"""What every stage shares: the :class:`Stage` interface and the :class:`Job` it runs in.

A stage is a small object with a ``name`` (its cache folder), the stage whose output it ``reads``,
its cache identity (``spec``, a :class:`grads.identity.StageSpec` declared beside it)
and ``run(job, work) -> info``, which writes its artefacts into the private ``work`` folder the
cache hands it. The pipeline is a loop over stages (:mod:`grads.pipeline`); adding a stage is one
module here (its run and its spec) and its entry in ``STAGES``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Protocol

from grads.identity import StageSpec


class StageInterrupted(RuntimeError):
    """A stage stopped before completing; its work folder is kept so the same command resumes."""


@dataclasses.dataclass
class Job:
    """One pipeline job: the resolved config and what is built once for it.

    Attributes:
        cfg: the resolved config (``features`` resolved for the selector).
        selector: the job's selector, instantiated once.
        keys: stage -> cache key.
        tracker: the experiment logger (``None``: none).
        cache: the stage cache (:class:`grads.cache.StageCache`).
        stages: the stages this job runs.
        dirs: stage -> output folder, filled as stages complete.
        labels: sample id -> group when ``select.balance`` is set (checked before any stage runs,
            :func:`grads.selectors.balance.preflight`), else ``None``.
    """

    cfg: dict
    selector: Any
    keys: dict[str, str]
    tracker: Any = None
    cache: Any = None
    stages: tuple[str, ...] = ()
    dirs: dict[str, Path] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] | None = None

    def need(self, stage: str) -> Path:
        """The output folder of ``stage``: run in this job, or already in the cache."""
        if stage in self.dirs:
            return self.dirs[stage]
        if self.cache is not None and self.cache.done(stage, self.keys[stage]):
            return self.cache.final(stage, self.keys[stage])
        raise RuntimeError(
            f"stage '{stage}' has no cached output for this config (key {self.keys[stage]}); "
            f"add it to stages=[...] (requested: {list(self.stages)})"
        )


class Stage(Protocol):
    """A pipeline stage: its name, the stage it reads, its cache identity and its run."""

    name: ClassVar[str]
    reads: ClassVar[str | None]

    @property
    def spec(self) -> StageSpec: ...

    def run(self, job: Job, work: Path) -> dict: ...


class StageBase:
    """What every stage class declares: its ``name``, the stage it ``reads`` and its ``spec``."""

    name: ClassVar[str] = ""
    reads: ClassVar[str | None] = None
    spec: ClassVar[StageSpec]

    def input_dir(self, job: Job) -> Path | None:
        """The output folder of the stage this one reads (``None`` for the first stage)."""
        return job.need(self.reads) if self.reads else None


def load_trained(cfg: dict, train_dir: Path):
    """The model a training stage saved (full weights, or base + LoRA adapter merged)."""
    from grads.training import load_trained as _load

    return _load(cfg["model"], train_dir, cache_dir=cfg["paths"]["model_dir"])


def train_stage(cfg: dict, use: str, work: Path, ids: list[str] | None, tracker) -> dict:
    """Run the trainer for ``use`` into ``work``; replay a multi-process run's log to the tracker.

    Raises:
        StageInterrupted: the trainer stopped early (``stop_after_steps``); ``work`` is kept.
    """
    from grads.io import read_jsonl
    from grads.training import TrainerSettings, train

    procs = TrainerSettings.from_cfg(cfg, use).resolved_procs()
    # In-process training logs each step to the tracker; spawned workers cannot reach it, so their
    # train_log.jsonl is replayed afterwards.
    log_fn = tracker.log if (tracker is not None and procs <= 1) else None
    summary = train(cfg, use, str(work), ids=ids, log_fn=log_fn) or {}
    if summary.get("stopped"):
        raise StageInterrupted(
            f"{use} stopped before completion (stop_after_steps); its checkpoints "
            f"are in {work}: re-run the same command to resume"
        )
    if tracker is not None and procs > 1 and (work / "train_log.jsonl").exists():
        for row in read_jsonl(work / "train_log.jsonl"):
            tracker.log({f"{use}/{k}": v for k, v in row.items() if k != "step"}, row.get("step"))
    return summary
