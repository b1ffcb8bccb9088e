"""The ``grads`` console script: a Hydra app whose job is :func:`grads.pipeline.run`.

Nothing heavy is imported here, so ``grads --help`` and ``grads --cfg job ...`` stay instant.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# An absolute path: Hydra would otherwise resolve a relative one as a Python module when the app is
# started through the console script. The repo's conf/ is used (editable install); GRADS_CONF_DIR
# points elsewhere.
CONF_DIR = os.environ.get("GRADS_CONF_DIR", str(Path(__file__).resolve().parent.parent / "conf"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> float | tuple[float, ...] | None:
    from grads.objective import check_objective, objective_value
    from grads.pipeline import run

    check_objective(cfg)  # a bad objective fails before the run, not after training
    # The configured metric(s) of metrics.json, for sweepers that optimise (hydra/sweeper=optuna).
    return objective_value(cfg, run(cfg))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
