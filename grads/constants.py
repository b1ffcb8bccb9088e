"""Where grads lives and the few constants every module shares (the single owner of each).

* :data:`REPO_ROOT`: the checkout that holds the ``grads`` package (grads runs from an editable
  install, so the package's parent folder is the repository).
* :func:`conf_dir`: the Hydra config folder, ``$GRADS_CONF_DIR`` when set, else ``<repo>/conf``. The
  CLI, the DeepSpeed JSON templates and every script read it through this function.
* :data:`DEFAULT_DATA_DIR`: ``<repo>/../shared/data``, the data folder beside the checkout.
* :data:`IGNORE_INDEX`: the label of tokens without loss (prompt, padding), as in PyTorch's
  ``cross_entropy(ignore_index=-100)`` and Hugging Face's collators.

Importing this module registers the OmegaConf resolvers the configs use (``grads.repo_root`` in
``conf/paths``, ``grads.budget_label`` in ``conf/budget``, ``grads.join``), so any code that
composes the config (the CLI, tests, scripts) resolves it the same way. Nothing heavy is imported
here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
IGNORE_INDEX = -100
# Path knobs that an environment variable may set (conf/paths/default.yaml reads them with oc.env).
PATH_ENV = {
    "root_dir": "GRADS_ROOT",
    "data_dir": "GRADS_DATA_DIR",
    "output_dir": "GRADS_OUTPUT_DIR",
    "cache_dir": "GRADS_CACHE_DIR",
    "model_dir": "GRADS_MODEL_DIR",
}


def conf_dir() -> Path:
    """The config folder: ``$GRADS_CONF_DIR`` (absolute, relative to the working directory), else
    the repository's ``conf/``.

    Raises:
        ValueError: ``GRADS_CONF_DIR`` is set but empty or not a folder.
    """
    env = os.environ.get("GRADS_CONF_DIR")
    if env is None:
        return REPO_ROOT / "conf"
    if not env.strip():
        raise ValueError(
            "GRADS_CONF_DIR is set but empty: unset it to use the repository's conf/ "
            f"({REPO_ROOT / 'conf'}) or point it at a config folder"
        )
    path = Path(os.path.abspath(os.path.expanduser(env)))
    if not (path / "config.yaml").is_file():
        raise ValueError(f"GRADS_CONF_DIR={env!r}: no config.yaml in {path}")
    return path


def budget_label(kind: str, value: Any) -> str:
    """A budget's short label: ``p<percent>`` (fraction), ``n<count>`` (count) or ``auto``.

    ``${grads.budget_label:${.kind},${.value}}`` in ``conf/budget`` makes the label follow the value
    actually used (``budget=n100 budget.value=15`` is ``n15``); the budget files' own values give
    their file names, so their labels (and the cache keys that hash them) are unchanged. A value
    that is not a valid budget gets ``<kind>=<value>`` (the config validation names the problem).
    """
    if kind == "auto":
        return "auto"
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "count" and number and value >= 1 and float(value).is_integer():
        return f"n{int(value)}"
    if kind == "fraction" and number and 0 < value <= 1:
        pct = float(value) * 100
        return f"p{int(pct)}" if pct.is_integer() else f"p{pct:g}"
    return f"{kind}={value}"


if not OmegaConf.has_resolver("grads.repo_root"):
    # ${grads.repo_root:} in conf/paths/default.yaml: defaults that do not depend on where grads
    # is started from (the data beside the checkout, one output/cache folder for every run).
    OmegaConf.register_new_resolver("grads.repo_root", lambda: str(REPO_ROOT))

if not OmegaConf.has_resolver("grads.join"):
    # ${grads.join:${selector.layers}} -> "embed+lm_head": readable method names for sweeps over a
    # list-valued knob (conf/experiment/paper_ablation.yaml names each rule x source combination).
    OmegaConf.register_new_resolver("grads.join", lambda items, sep="+": sep.join(map(str, items)))

if not OmegaConf.has_resolver("grads.budget_label"):
    OmegaConf.register_new_resolver("grads.budget_label", budget_label)
