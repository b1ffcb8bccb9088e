"""The scalar a sweep optimises: one key (or several) of a run's ``metrics.json``, chosen in config.

``objective.metric`` names the key (``domain_acc`` by default; nested keys as ``a/b``, e.g.
``tasks/grads_synthetic/acc``), ``objective.direction`` says ``maximize`` or ``minimize``. A list of
metrics (with one direction each) makes a multi-objective study, e.g. learn more and forget less::

    objective.metric=[domain_gain,forgetting] objective.direction=[maximize,minimize]

``objective.required`` decides what a missing metric does: ``true`` raises, ``false`` returns
``None`` (nothing to optimise), ``auto`` (default) raises only when an optimising sweeper (Optuna,
Nevergrad, Ax: any multirun sweeper but Hydra's basic one) is waiting for the value.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str | int | float):
        return [value]
    return list(value)


def check_objective(cfg: Any) -> tuple[list[str], list[str]]:
    """Validate ``cfg.objective`` before the run; returns ``(metrics, directions)``.

    Raises:
        ValueError: an unknown direction, a metric/direction count mismatch, or a direction that
            contradicts the Optuna sweeper's (``hydra.sweeper.direction``).
    """
    obj = (cfg.get("objective") if hasattr(cfg, "get") else None) or {}
    metrics = [str(m) for m in _as_list(obj.get("metric", "domain_acc"))]
    directions = [str(d) for d in _as_list(obj.get("direction", "maximize"))]
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ValueError(f"objective.direction={bad}: expected maximize or minimize")
    if len(directions) == 1 and len(metrics) > 1:
        directions = directions * len(metrics)
    if metrics and len(directions) != len(metrics):
        raise ValueError(
            f"objective.metric={metrics} needs one direction each; got objective.direction={directions}"
        )
    required = obj.get("required", "auto")
    if required not in ("auto", True, False):
        raise ValueError(f"objective.required={required!r}: expected auto, true or false")
    sweeper_dirs = _sweeper_directions()
    if sweeper_dirs is not None and metrics and sweeper_dirs != directions:
        raise ValueError(
            f"hydra.sweeper.direction={sweeper_dirs} but objective.direction={directions}: set "
            "hydra.sweeper.direction=${objective.direction} (the hpo_* experiments do)"
        )
    return metrics, directions


def lookup(metrics: dict, key: str) -> Any:
    """``metrics[key]``, where ``a/b`` (or ``a.b`` when no such flat key exists) walks nested dicts."""
    if key in metrics:
        return metrics[key]
    for sep in ("/", "."):
        node: Any = metrics
        for part in key.split(sep):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return None


def objective_value(cfg: Any, metrics: dict | None) -> float | tuple[float, ...] | None:
    """The value(s) the Hydra app returns: ``float`` for one metric, a tuple for several.

    Raises:
        KeyError: a metric is missing (or not a number) and the objective is required; the message
            lists the numeric keys the run did produce.
    """
    names, _ = check_objective(cfg)
    if not names:
        return None
    metrics = metrics or {}
    values = [lookup(metrics, n) for n in names]
    bad = [
        n for n, v in zip(names, values) if isinstance(v, bool) or not isinstance(v, int | float)
    ]
    if bad:
        if _required(cfg):
            raise KeyError(
                f"objective.metric {bad} not in this run's metrics (stages {metrics.get('stages')}); "
                f"numeric keys: {sorted(_numeric_keys(metrics))}. Choose one with objective.metric=KEY"
            )
        log.info("objective %s not in the metrics: returning None", bad)
        return None
    out = tuple(float(v) for v in values)
    if any(math.isnan(v) for v in out):
        log.warning("objective %s = %s: the sweeper will count this trial as failed", names, out)
    return out[0] if len(out) == 1 else out


def _numeric_keys(metrics: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            keys += _numeric_keys(v, f"{prefix}{k}/")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            keys.append(f"{prefix}{k}")
    return keys


def _hydra_cfg():
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


def _optimising_sweeper() -> bool:
    """A multirun whose sweeper consumes return values (anything but Hydra's BasicSweeper)."""
    hc = _hydra_cfg()
    if hc is None or str(hc.mode) != "RunMode.MULTIRUN":
        return False
    target = str((hc.sweeper or {}).get("_target_", ""))
    return bool(target) and not target.endswith("BasicSweeper")


def _sweeper_directions() -> list[str] | None:
    hc = _hydra_cfg()
    if hc is None or "optuna" not in str((hc.sweeper or {}).get("_target_", "")).lower():
        return None
    return [str(getattr(d, "name", d)) for d in _as_list(hc.sweeper.get("direction"))]


def _required(cfg: Any) -> bool:
    required = ((cfg.get("objective") if hasattr(cfg, "get") else None) or {}).get(
        "required", "auto"
    )
    return _optimising_sweeper() if required == "auto" else bool(required)
