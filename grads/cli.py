"""The ``grads`` console script: a Hydra app whose job is :func:`grads.pipeline.run`.

Nothing heavy is imported here, so ``grads --help`` and ``grads --cfg job ...`` stay instant. Library
modules never import this one: the config folder and the repository root live in
:mod:`grads.constants`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from grads.constants import conf_dir

# An absolute path: Hydra would otherwise resolve a relative one as a Python module when the app is
# started through the console script. GRADS_CONF_DIR points elsewhere (see grads.constants).
CONF_DIR = str(conf_dir())


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
