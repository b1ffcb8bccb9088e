"""The ``grads`` console script: a Hydra app whose job is :func:`grads.pipeline.run`.

Nothing heavy is imported here, so ``grads --help`` and ``grads --cfg job ...`` stay instant. Library
modules never import this one: the config folder and the repository root live in
:mod:`grads.constants`.

User errors (:mod:`grads.errors`: a bad config value, a malformed record, a missing file) print
as their message alone and exit with status 1 (:func:`grads.errors.hydra_reported`);
``HYDRA_FULL_ERROR=1`` shows their traceback. Other errors keep Hydra's traceback.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from grads.constants import conf_dir
from grads.errors import hydra_reported

# An absolute path: Hydra would otherwise resolve a relative one as a Python module when the app is
# started through the console script. GRADS_CONF_DIR points elsewhere (see grads.constants).
CONF_DIR = str(conf_dir())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> float | tuple[float, ...] | None:
    from grads.objective import check_objective, objective_value
    from grads.pipeline import run

    with hydra_reported():
        check_objective(cfg)  # a bad objective fails before the run, not after training
        # The configured metric(s) of metrics.json, for sweepers that optimise (hydra/sweeper=optuna).
        return objective_value(cfg, run(cfg))


def main() -> None:
    import sys

    from grads.cli.agent import before_hydra

    # torchrun / several nodes: ranks other than 0 serve rank 0 without Hydra (no run folder), and
    # a node started with dist.nnodes > 1 becomes that node's elastic agent (grads.launch).
    if before_hydra(sys.argv, "grads.cli.main"):
        return
    _app()


if __name__ == "__main__":
    main()
