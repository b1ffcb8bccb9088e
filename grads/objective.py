"""The scalar a sweep optimises: one key (or several) of a run's ``metrics.json``, chosen in config.

``objective.metric`` names the key (``domain_acc`` by default; nested keys as ``a/b``, e.g.
``tasks/grads_synthetic/acc``), ``objective.direction`` says ``maximize`` or ``minimize``. A list of
metrics (with one direction each) makes a multi-objective study, e.g. learn more and forget less::

    objective.metric=[domain_gain,forgetting] objective.direction=[maximize,minimize]

``objective.required`` decides what a missing metric does: ``true`` raises, ``false`` returns
``None`` (nothing to optimise), ``auto`` (default) raises only when an optimising sweeper (Optuna,
Nevergrad, Ax: any multirun sweeper but Hydra's basic one) is waiting for the value.

A metric the run cannot produce is known from its config alone (:func:`producible`: which stages
run, which evaluation parts have tasks: domain accuracy tasks, general tasks, a held-out split
scored by ``eval.domain_loss_tasks``, reference answers, plain text, KL). Where the objective is
required, :func:`check_objective` refuses such a metric before any stage runs, naming the metrics
the run does produce, and the hpo_* experiments' :class:`ObjectiveCheck` callback does so before the
sweeper asks for its first trial. The default objective is ``domain_bpb`` (held-out bits per byte,
minimised): every shipped domain, and a custom pool, has a held-out split in runs that evaluate.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
# Fallbacks for a config without an objective block (conf/config.yaml sets the same).
DEFAULT_METRIC, DEFAULT_DIRECTION = "domain_bpb", "minimize"


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
    metrics = [str(m) for m in _as_list(obj.get("metric", DEFAULT_METRIC))]
    directions = [str(d) for d in _as_list(obj.get("direction", DEFAULT_DIRECTION))]
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
    problem = unproducible_message(cfg, metrics)
    if problem and _required(cfg):
        raise ValueError(problem)
    if problem:
        log.info("%s", problem)
    return metrics, directions


# --------------------------------------------------------------------------------------------------
# Which metrics a run can produce, from its config alone
# --------------------------------------------------------------------------------------------------
# What each evaluation part needs (grads.evaluation.metrics.LOSS_PARTS and the accuracy parts).
PART_NEEDS = {
    "domain": "domain accuracy tasks (domain.eval_tasks)",
    "general": "general tasks (eval.general_tasks or domain.eval_tasks_general)",
    "domain_loss": "a held-out split (domain.heldout) scored by eval.domain_loss_tasks",
    "ref": "reference-answer tasks (eval.ref_tasks)",
    "text": "plain-text tasks (eval.text_tasks)",
    "kl": "a KL task (eval.kl_task)",
}
# Keys every run writes; keys a stage adds (the evaluate stage's come from its parts).
RUN_KEYS = {"seed": None, "wall_s": None, "selection_cost_s": None}
STAGE_KEYS = {"n_pool": "select", "n_selected": "select"}
NESTED_STAGES = {"cost": None, "data": "features", "selection": "select"}


def metric_parts() -> dict[str, str]:
    """Every evaluation metric a run's metrics.json may carry -> the part it is computed from."""
    from grads.evaluation.metrics import GAIN_NAMES, ITEM_METRICS

    out = {"domain_gain": "domain", "forgetting": "general"}
    for name, metric in ITEM_METRICS.items():
        out[name] = out[f"base_{name}"] = metric.part
    for name, gain in GAIN_NAMES.items():
        out[gain] = ITEM_METRICS[name].part
    return out


def _plain(cfg: Any) -> dict:
    """The nodes of ``cfg`` that decide its metrics, resolved (a DictConfig's own interpolations)."""
    from omegaconf import OmegaConf

    out = {}
    for key in ("stages", "eval", "domain", "paths"):
        node = cfg.get(key) if hasattr(cfg, "get") else None
        out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return out


def run_parts(cfg: dict) -> dict[str, list[str]]:
    """The evaluation parts the run scores (part -> its tasks); empty when it does not evaluate."""
    from grads.constants import STAGES
    from grads.evaluation.settings import eval_settings, part_lists

    if "evaluate" not in (cfg.get("stages") or STAGES):
        return {}
    ev = eval_settings(cfg)
    if not ev["enabled"]:
        return {}
    parts = {part: names for part, names in part_lists(cfg).items() if names}
    if parts and ev["kl_task"]:
        parts["kl"] = [ev["kl_task"]]
    return parts


def producible(cfg: Any) -> list[str]:
    """The top-level metric keys (and ``tasks/<task>/acc``) the run's metrics.json will carry."""
    from grads.constants import STAGES

    plain = _plain(cfg)
    stages = plain.get("stages") or STAGES
    parts = run_parts(plain)
    keys = [k for k in RUN_KEYS] + [k for k, stage in STAGE_KEYS.items() if stage in stages]
    keys += [m for m, part in metric_parts().items() if part in parts]
    acc_tasks = parts.get("domain", []) + parts.get("general", [])
    return sorted(keys) + [f"tasks/{t}/acc" for t in acc_tasks]


def _why_not(name: str, plain: dict, parts: dict) -> str | None:
    """Why the run cannot produce metric ``name`` (None: it can, or the config cannot tell)."""
    from grads.constants import STAGES
    from grads.evaluation.settings import eval_settings

    stages = plain.get("stages") or STAGES
    head, _, rest = name.partition("/") if "/" in name else name.partition(".")
    if not rest:
        part = metric_parts().get(name)
        if part is not None:
            if "evaluate" not in stages:
                return (
                    f"{name} comes from the evaluate stage, which this run skips (stages={stages})"
                )
            if not eval_settings(plain)["enabled"]:
                return f"{name} comes from the evaluation, which is off (eval.enabled=false)"
            if part not in parts:
                return f"{name} needs {PART_NEEDS[part]}; this run has none"
            return None
        if name in STAGE_KEYS and STAGE_KEYS[name] not in stages:
            return f"{name} comes from the {STAGE_KEYS[name]} stage, which this run skips"
        if name in RUN_KEYS or name in STAGE_KEYS:
            return None
        return f"{name} is not a key grads writes to metrics.json"
    if head in ("tasks", "loss_tasks"):
        task = rest.replace(".", "/").split("/")[0]
        acc = head == "tasks"  # accuracy tasks; loss_tasks: the log-likelihood parts
        names = [t for p, ts in parts.items() if (p in ("domain", "general")) == acc for t in ts]
        return None if task in names else f"{name}: no task '{task}' among this run's {names}"
    if head in NESTED_STAGES:
        stage = NESTED_STAGES[head] or rest.replace(".", "/").split("/")[0]
        return None if stage in stages else f"{name}: the {stage} stage does not run"
    return None  # other nested keys (export/...): only the run can tell


def unproducible_message(cfg: Any, names: list[str]) -> str | None:
    """An error message for the objective metrics ``names`` the run cannot produce, else None.

    A config that does not resolve or evaluate cleanly is left to the run's own validation.
    """
    try:
        plain = _plain(cfg)
        if not plain.get("domain"):  # not a run's config (e.g. an objective block alone)
            return None
        parts = run_parts(plain)
        reasons = [r for n in names if (r := _why_not(n, plain, parts))]
        have = producible(cfg) if reasons else []
    except Exception as exc:  # noqa: BLE001 - grads.config.validate_config reports it properly
        log.debug("objective check skipped: %s", exc)
        return None
    if not reasons:
        return None
    domain = (plain.get("domain") or {}).get("name", "?")
    return (
        f"objective.metric {names} cannot come from this run (domain '{domain}'): "
        + "; ".join(reasons)
        + f". This run's metrics: {have}. Choose one with objective.metric=KEY "
        "objective.direction=maximize|minimize"
    )


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


def _required(cfg: Any, optimising: bool | None = None) -> bool:
    required = ((cfg.get("objective") if hasattr(cfg, "get") else None) or {}).get(
        "required", "auto"
    )
    if required != "auto":
        return bool(required)
    return _optimising_sweeper() if optimising is None else optimising


class ObjectiveCheck(Callback):
    """Hydra callback of the hpo_* experiments: the objective is checked (directions and whether
    the run can produce its metrics) when the multirun starts, before the sweeper creates its study
    or asks for a first trial. Every job checks again in :func:`check_objective` (with the trial's
    own overrides).

    Hydra turns an exception raised in a callback into a warning and goes on, so a problem ends
    the process with ``SystemExit`` (the message on stderr, exit status 1) instead.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
        optimising = bool(target) and not target.endswith("BasicSweeper")
        try:
            metrics, _ = check_objective(config)
        except ValueError as exc:
            raise SystemExit(f"Error: {exc}") from exc
        problem = unproducible_message(config, metrics)
        if problem and _required(config, optimising):
            raise SystemExit(f"Error: {problem}")


class StudyStorage(Callback):
    """Hydra callback of the hpo_* experiments: prepares an RDB study storage
    (``hydra.sweeper.storage=sqlite:///hpo.db``) before the Optuna sweeper opens it.

    The sweeper's Optuna (< 3, pinned by hydra-optuna-sweeper) stamps the schema version of a new
    database on a connection that SQLAlchemy 2 never commits, so opening the fresh file fails with
    an ``AssertionError`` in ``get_current_version``. Creating the storage once on an autocommit
    engine stamps it; the sweeper then creates or resumes its study there as usual.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        url = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if not isinstance(url, str) or not url.strip():
            return
        from optuna.storages import RDBStorage

        RDBStorage(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"})
