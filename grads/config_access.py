"""Reading configs: a plain dict of a resolved config, one knob with a default, and the YAML
defaults of a node (the one place code reads a default from, so that no value is written twice).

The lowest layer: every module may use it. The validator that checks a composed config before any
stage runs is :mod:`grads.config`, at the top.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from grads.constants import conf_dir

# Groups whose options write into another node (`# @package <node>`): one axis per group, one node.
PACKAGED_INTO = {"trainer": ("tuning",)}


def as_dict(cfg: Any) -> dict:
    """A plain resolved dict from a dict or an OmegaConf config (workers never see interpolations)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` of a dict, a ``DictConfig`` or an object; ``default`` when absent or null."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def load_node(path: Path) -> dict:
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return node if isinstance(node, dict) else {}


@functools.cache
def primary_config(conf: str) -> dict:
    return load_node(Path(conf) / "config.yaml")


def defaults(node: str) -> dict:
    """The YAML defaults of a node: a ``conf/config.yaml`` node (``data``, ``features``, ...) or
    the default option of a group (``trainer`` -> ``conf/trainer/cpu.yaml``), unresolved.

    This is the one place code reads a default from, so that no value is written twice.
    """
    conf = str(conf_dir())
    primary = primary_config(conf)
    if isinstance(primary.get(node), dict):
        return dict(primary[node])
    choices = {
        next(iter(e)): e[next(iter(e))]
        for e in primary.get("defaults") or []
        if isinstance(e, dict)
    }
    if node not in choices:
        raise KeyError(f"no defaults for config node {node!r}")
    out = option_defaults(conf, node, str(choices[node]))
    # Groups packaged into this node (`# @package trainer` in conf/tuning/*.yaml) add their knobs.
    for group in PACKAGED_INTO.get(node, ()):
        out.update(option_defaults(conf, group, str(choices[group])))
    return out


@functools.cache
def _option_cached(conf: str, group: str, name: str) -> dict:
    node = load_node(Path(conf) / group / f"{name}.yaml")
    merged: dict = {}
    for entry in node.pop("defaults", None) or []:  # e.g. zero2.yaml extends cpu.yaml
        if isinstance(entry, str) and entry != "_self_":
            merged.update(_option_cached(conf, group, entry))
    merged.update(node)
    return merged


def option_defaults(conf: str, group: str, name: str) -> dict:
    import copy

    return copy.deepcopy(_option_cached(conf, group, name))
