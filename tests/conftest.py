"""Shared fixtures: offline environment, the shared data folder, tiny models, Hydra composition.

The suite sees the same default paths a newcomer does: no ``GRADS_DATA_DIR`` is set here (the
default ``<repo>/../shared/data`` of ``conf/paths`` is used unless the caller's environment sets one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grads.constants import DEFAULT_DATA_DIR, REPO_ROOT, conf_dir

REPO = REPO_ROOT
CONF_DIR = conf_dir()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Required dependencies (setup.cfg install_requires): a test that `importorskip`s one of them must
# fail, not skip, when it cannot be imported, or a broken install would pass as a green run.
REQUIRED_IMPORTS = {
    "torch",
    "transformers",
    "datasets",
    "deepspeed",
    "peft",
    "lm_eval",
    "KDEpy",
    "hydra",
    "omegaconf",
    "numpy",
    "pandas",
    "pyarrow",
    "safetensors",
    "wandb",
}


def _required_import_skip(report) -> str | None:
    if not report.skipped:
        return None
    text = str(report.longrepr)
    for name in REQUIRED_IMPORTS:
        if f"could not import '{name}'" in text:
            return name
    return None


def _fail_required_skip(report) -> None:
    name = _required_import_skip(report)
    if name is not None:
        report.outcome = "failed"
        report.longrepr = f"required dependency {name!r} cannot be imported: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_required_skip(outcome.get_result())  # module-level importorskip


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_skip(outcome.get_result())  # importorskip inside a test


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("GRADS_DATA_DIR") or DEFAULT_DATA_DIR).resolve()
    if not (path / "INDEX.md").exists():
        pytest.fail(
            f"shared data not found at {path}: put shared/ beside the repo or set GRADS_DATA_DIR"
        )
    return path


@pytest.fixture(scope="session")
def tiny():
    from grads.models import build_tiny

    return build_tiny(tied=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from grads.models import tiny_tokenizer

    return tiny_tokenizer()


def compose(
    overrides: list[str] | None = None,
    return_hydra_config: bool = False,
    config_dir: str | os.PathLike | None = None,
):
    """Compose the primary config as the CLI would (no run); ``config_dir`` defaults to conf/."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
        return _compose(
            "config", overrides=overrides or [], return_hydra_config=return_hydra_config
        )


def sweep_axes(params: dict) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` as ``{key: [value, ...]}``, split by Hydra's own override parser (a
    list value such as ``[embed,lm_head]`` is one value, not two)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    axes = {}
    for key, vals in params.items():
        (o,) = parser.parse_overrides([f"{key}={vals}"])
        axes[key] = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
    return axes
