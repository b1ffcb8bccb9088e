"""Experiment tracking: Weights & Biases (offline by default) on rank 0, or nothing.

Every tracker has the same four calls, so stages never check which one is active. Local files
(``metrics.json``, ``train_log.jsonl``) are written regardless of the tracker.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    """Records nothing (tests, non-zero ranks)."""

    def start(self, name: str, group: str, tags: list[str], config: dict, run_dir: str) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: str | os.PathLike) -> None:
        pass

    def log_table(self, key: str, rows: list[dict]) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    """One W&B run per job: ``group`` = sweep, tags = domain/selector/budget/model.

    Args:
        mode: ``offline`` (default), ``online`` or ``disabled``; the ``WANDB_MODE`` environment
            variable takes precedence, as W&B users expect.
        project, entity: the W&B project and entity.
        dir: where the ``wandb/`` folder is written.
    """

    def __init__(
        self,
        mode: str = "offline",
        project: str = "grads",
        entity: str | None = None,
        dir: str | None = None,
    ):
        self.mode = os.environ.get("WANDB_MODE", mode)
        self.project, self.entity, self.dir = project, entity, dir
        self.run = None

    def start(self, name, group, tags, config, run_dir) -> None:
        from grads.dist import is_main

        if not is_main() or self.mode == "disabled":
            return
        import wandb

        Path(self.dir or run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=name,
            group=group,
            tags=[str(t) for t in tags][:64],
            config=config,
            mode=self.mode,
            dir=str(self.dir or run_dir),
            reinit="finish_previous",
        )

    def log(self, metrics, step=None) -> None:
        if self.run is not None:
            row = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
            # Stages restart their own step counters (warm-up, then fine-tune): W&B's global step must
            # only grow, so the stage step is logged as a metric instead.
            if step is not None:
                prefix = next(iter(row), "").split("/")[0]
                row[f"{prefix}/step" if "/" in next(iter(row), "") else "step"] = step
            self.run.log(row)

    def log_image(self, key, path) -> None:
        if self.run is not None and Path(path).exists():
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def log_table(self, key, rows) -> None:
        if self.run is not None and rows:
            import wandb

            cols = list(dict.fromkeys(k for r in rows for k in r))
            self.run.log(
                {key: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}
            )

    def summary(self, metrics) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float | str):
                    self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
