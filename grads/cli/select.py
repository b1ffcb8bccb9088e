"""The ``grads-select`` console script: warm-up -> features -> select on a pool, export it, stop.

The practitioner's path: bring a pool, take the subset GrADS picks as files a trainer reads::

    grads-select domain=custom domain.path=pool.jsonl budget=p10 export.dir=my_subset

It composes the same config as ``grads`` (every override works: ``model=``, ``selector=``,
``budget=``, ``trainer=``...), runs only the first three stages (sharing their cache with ``grads``)
and always exports (:mod:`grads.export`). Nothing heavy is imported at module level. User errors
print as one message, as in ``grads`` (:func:`grads.errors.hydra_reported`).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from grads.constants import conf_dir
from grads.errors import hydra_reported

log = logging.getLogger(__name__)

SELECT_STAGES = ["warmup", "features", "select"]


def select(cfg: DictConfig) -> dict:
    """Run warm-up, features and select for ``cfg`` with the export on; returns the metrics.

    A ``stages=`` override is replaced by the three selection stages (with a warning if it asked for
    fine-tuning or evaluation: those belong to ``grads``).
    """
    from grads.pipeline import run

    asked = list(cfg.get("stages") or [])
    extra = [s for s in asked if s not in SELECT_STAGES]
    if extra and asked != ["warmup", "features", "select", "finetune", "evaluate"]:
        log.warning("grads-select stops after select: ignoring stages %s (use `grads`)", extra)
    cfg.stages = list(SELECT_STAGES)
    cfg.export.enabled = True
    metrics = run(cfg)
    exp = metrics.get("export") or {}
    print(
        f"selected {exp.get('rows')} of {exp.get('pool_size')} records:\n"
        f"  {exp.get('jsonl')}\n  {exp.get('dataset')}   (datasets.load_from_disk)\n"
        f"  {exp.get('plot') or '(no plot for this selector)'}"
    )
    return metrics


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _app(cfg: DictConfig) -> None:
    with hydra_reported():  # a user error prints as one message
        select(cfg)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
