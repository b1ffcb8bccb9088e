"""Where grads lives and the few constants every module shares (the single owner of each).

grads runs either from a **checkout** (an editable install, or the repository on ``PYTHONPATH``) or
**installed** (``pip install .`` or a wheel). What differs is where its defaults point:

* configs: ``<repo>/conf`` in a checkout; installed, ``grads/conf`` inside the package (the wheel
  ships the repository's ``conf/`` as the package ``grads.conf``).
* outputs, caches, models, W&B files: ``$GRADS_HOME/outputs``, else ``<repo>/outputs`` in a
  checkout and ``outputs/`` in the directory ``grads`` is started in when installed (never the
  package).
* data of the real domains: ``$GRADS_DATA_DIR``, else ``<repo>/../shared/data`` in a checkout;
  installed there is no default (a run that reads data names the variable before anything runs).

* :data:`REPO_ROOT`: the package's parent folder (the repository in a checkout).
* :data:`CHECKOUT`: whether that folder is a repository (``setup.cfg`` and ``conf/config.yaml``).
* :func:`conf_dir`: the Hydra config folder, ``$GRADS_CONF_DIR`` when set, else the one above. The
  CLI, the DeepSpeed JSON templates and every script read it through this function.
* :func:`home_dir`: the folder ``paths.root_dir`` (outputs) hangs off when no variable sets it.
* :func:`default_data_dir`: the data folder when ``GRADS_DATA_DIR`` is unset (None when installed).
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

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
# The configs inside an installed package (setup.cfg maps the repository's conf/ to grads.conf).
PACKAGE_CONF = PACKAGE_DIR / "conf"
CHECKOUT = (REPO_ROOT / "setup.cfg").is_file() and (REPO_ROOT / "conf" / "config.yaml").is_file()
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
IGNORE_INDEX = -100
# Path knobs that an environment variable may set (conf/paths/default.yaml reads them with oc.env).
PATH_ENV = {
    "root_dir": "GRADS_HOME",
    "data_dir": "GRADS_DATA_DIR",
    "output_dir": "GRADS_OUTPUT_DIR",
    "cache_dir": "GRADS_CACHE_DIR",
    "model_dir": "GRADS_MODEL_DIR",
}


def shipped_conf_dir() -> Path:
    """The configs that come with grads: ``<repo>/conf`` in a checkout, else the package's own.

    Raises:
        FileNotFoundError: neither holds a ``config.yaml`` (a broken install).
    """
    for path in (REPO_ROOT / "conf", PACKAGE_CONF) if CHECKOUT else (PACKAGE_CONF,):
        if (path / "config.yaml").is_file():
            return path
    raise FileNotFoundError(
        f"no grads configs in {PACKAGE_CONF}: this install lacks its package data; reinstall "
        "grads (pip install .) or set GRADS_CONF_DIR to a config folder"
    )


def conf_dir() -> Path:
    """The config folder: ``$GRADS_CONF_DIR`` (absolute, relative to the working directory), else
    :func:`shipped_conf_dir`.

    Raises:
        ValueError: ``GRADS_CONF_DIR`` is set but empty or not a folder.
    """
    env = os.environ.get("GRADS_CONF_DIR")
    if env is None:
        return shipped_conf_dir()
    if not env.strip():
        raise ValueError(
            "GRADS_CONF_DIR is set but empty: unset it to use the shipped configs "
            f"({shipped_conf_dir()}) or point it at a config folder"
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


def home_dir() -> Path:
    """Where ``outputs/`` goes by default (``paths.root_dir`` when ``GRADS_HOME`` is unset): the
    repository in a checkout, the working directory when installed (never the package)."""
    return REPO_ROOT if CHECKOUT else Path.cwd()


def default_data_dir() -> str | None:
    """``paths.data_dir`` when ``GRADS_DATA_DIR`` is unset: ``<repo>/../shared/data`` in a checkout;
    None when installed (grads.config then names the variable to set if a run reads data)."""
    return str(DEFAULT_DATA_DIR) if CHECKOUT else None


if not OmegaConf.has_resolver("grads.repo_root"):
    # ${grads.repo_root:}: the package's parent folder (the repository in a checkout).
    OmegaConf.register_new_resolver("grads.repo_root", lambda: str(REPO_ROOT))

if not OmegaConf.has_resolver("grads.home"):
    # ${grads.home:} in conf/paths/default.yaml: the repository in a checkout (the same folder from
    # any working directory), the working directory when installed.
    OmegaConf.register_new_resolver("grads.home", lambda: str(home_dir()))

if not OmegaConf.has_resolver("grads.data_dir"):
    OmegaConf.register_new_resolver("grads.data_dir", default_data_dir)

if not OmegaConf.has_resolver("grads.join"):
    # ${grads.join:${selector.layers}} -> "embed+lm_head": readable method names for sweeps over a
    # list-valued knob (conf/experiment/paper_ablation.yaml names each rule x source combination).
    OmegaConf.register_new_resolver("grads.join", lambda items, sep="+": sep.join(map(str, items)))

if not OmegaConf.has_resolver("grads.budget_label"):
    OmegaConf.register_new_resolver("grads.budget_label", budget_label)


# The pipeline's stages, in run order (grads.stages holds one object per stage).
STAGES = ("warmup", "features", "select", "finetune", "evaluate")
