"""Shared fixtures: offline environment, the shared data folder, tiny models, Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADS_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["GRADS_DATA_DIR"])
    if not (path / "INDEX.md").exists():
        pytest.fail(f"shared data not found at {path}: set GRADS_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def tiny():
    from grads.models import build_tiny

    return build_tiny(tied=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from grads.models import tiny_tokenizer

    return tiny_tokenizer()


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose the primary config as the CLI would (no run)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose(
            "config", overrides=overrides or [], return_hydra_config=return_hydra_config
        )
