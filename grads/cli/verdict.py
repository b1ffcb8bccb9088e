"""The ``grads-verdict`` console script: is the subset better than random on this pool?

Composes ``conf/verdict.yaml``: the same config as ``grads`` (every override works: ``domain=``,
``model=``, ``budget=``, ``experiment=``...) plus the ``verdict`` block, and runs
:func:`grads.verdict.runner.run_verdict`::

    grads-verdict domain=custom domain.path=pool.jsonl verdict.selectors=[grads,grads_paper]

Nothing heavy is imported here, so ``grads-verdict --cfg job`` stays instant.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from grads.constants import conf_dir


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="verdict")
def _app(cfg: DictConfig) -> None:
    from grads.verdict.runner import run_verdict

    run_verdict(cfg)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
