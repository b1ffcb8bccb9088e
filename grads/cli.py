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
def _app(cfg: DictConfig) -> float | None:
    from grads.pipeline import run

    metrics = run(cfg)
    # Returning a float lets Hydra sweepers (e.g. Optuna) optimise a run's headline number.
    value = (metrics or {}).get("domain_acc")
    return float(value) if isinstance(value, int | float) else None


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
