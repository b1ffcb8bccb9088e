"""The ``eval`` settings of a run: defaults, checks, the task lists of each metric part, and the
folders and generated files the local tasks read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grads.config_access import as_dict, cfg_get
from grads.errors import UserError
from grads.evaluation.tasks import TASKS_DIR

# Generated tasks and the key of their file in grads.data.synthetic.materialise()'s result.
SYNTHETIC_TASKS = {"grads_synthetic": "eval_mc", "grads_probe": "probe"}
SYNTHETIC_METADATA = {"eval_mc": "synthetic_eval_mc", "probe": "synthetic_probe"}
# Tasks that read the run domain's held-out split (grads.data.heldout.materialise -> metadata key).
HELDOUT_TASKS = {"grads_heldout": "heldout_path"}

EVAL_DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "enabled": True,
    "tasks_from": "local",  # local: grads_* offline tasks | hub: lm-eval built-ins
    "general_tasks": [],
    "general_tasks_hub": [],
    "batch_size": 8,
    "max_length": None,
    "num_fewshot": None,  # None: each task's own default (0 unless its YAML says otherwise)
    "apply_chat_template": False,
    "fewshot_as_multiturn": None,  # None: follow apply_chat_template
    "system_instruction": None,
    "limit": None,
    "task_limits": {},
    "metric": "acc",
    "seed": 1234,
    "bootstrap_iters": 1000,
    "include_paths": [],
    # Continuous metrics (see grads.evaluation.metrics.LOSS_PARTS): log-likelihood task lists and
    # the task whose items also get KL(base || tuned), on its first ``kl_limit`` items.
    "domain_loss_tasks": [],
    "ref_tasks": [],
    "text_tasks": [],
    "kl_task": None,
    "kl_limit": None,
}


class TaskConfigError(UserError, ValueError):
    """A requested evaluation task that is unknown, malformed, or whose data cannot be loaded."""


def eval_settings(cfg: Any) -> dict:
    """``cfg["eval"]`` merged over :data:`EVAL_DEFAULTS`, with its values checked.

    Raises:
        TaskConfigError: on an unknown ``tasks_from`` / ``metric`` or a negative limit.
    """
    ev = dict(EVAL_DEFAULTS)
    ev.update(as_dict(cfg).get("eval") or {})
    for key, default in EVAL_DEFAULTS.items():  # a null knob means "default" where null is no value
        if ev[key] is None and default is not None:
            ev[key] = default
    if ev["tasks_from"] not in ("local", "hub"):
        raise TaskConfigError(f"eval.tasks_from={ev['tasks_from']!r}: expected 'local' or 'hub'")
    if ev["metric"] not in ("acc", "acc_norm"):
        raise TaskConfigError(f"eval.metric={ev['metric']!r}: expected 'acc' or 'acc_norm'")
    for name, lim in [("eval.limit", ev["limit"])] + [
        (f"eval.task_limits.{k}", v) for k, v in (ev["task_limits"] or {}).items()
    ]:
        if lim is not None and (
            isinstance(lim, bool) or not isinstance(lim, int | float) or lim < 0
        ):
            raise TaskConfigError(
                f"{name}={lim!r}: expected null, a count >= 0 or a fraction in (0, 1)"
            )
    kl_limit = ev["kl_limit"]
    if kl_limit is not None and (
        isinstance(kl_limit, bool) or not isinstance(kl_limit, int) or kl_limit < 1
    ):
        raise TaskConfigError(f"eval.kl_limit={kl_limit!r}: expected null or a count >= 1")
    ev["task_limits"] = dict(ev["task_limits"] or {})
    return ev


def task_lists(cfg: Any) -> tuple[list[str], list[str]]:
    """The domain and general task names of a run.

    Domain: ``domain.eval_tasks`` (``domain.eval_tasks_hub`` when ``eval.tasks_from=hub``). General:
    ``eval.general_tasks`` (``eval.general_tasks_hub``) plus the domain's own ``eval_tasks_general``
    (e.g. the synthetic domain's ``grads_probe``). Duplicates are dropped, order kept.
    """
    cfg = as_dict(cfg)
    ev, dom = eval_settings(cfg), cfg.get("domain") or {}
    hub = ev["tasks_from"] == "hub"
    domain = list(dom.get("eval_tasks_hub" if hub else "eval_tasks") or [])
    general = list(ev["general_tasks_hub" if hub else "general_tasks"] or [])
    general += list(dom.get("eval_tasks_general") or [])
    domain = list(dict.fromkeys(domain))
    general = [t for t in dict.fromkeys(general) if t not in domain]
    return domain, general


def part_lists(cfg: Any) -> dict[str, list[str]]:
    """Every task list of a run by part: ``domain``/``general`` (accuracy, :func:`task_lists`) and
    the log-likelihood parts ``domain_loss``/``ref``/``text`` (``eval.<part>_tasks``).

    A task listed in an accuracy part is not repeated in a loss part.
    """
    from grads.evaluation.metrics import LOSS_PARTS

    ev = eval_settings(cfg)
    domain, general = task_lists(cfg)
    parts = {"domain": domain, "general": general}
    seen = set(domain) | set(general)
    # A domain without a held-out split (e.g. a custom pool, whose every sample is for selection)
    # has no held-out loss to measure.
    skip = set(HELDOUT_TASKS) if not (as_dict(cfg).get("domain") or {}).get("heldout") else set()
    for part, key in LOSS_PARTS.items():
        names = [t for t in dict.fromkeys(ev[key] or []) if t not in seen | skip]
        seen |= set(names)
        parts[part] = names
    kl = ev["kl_task"]
    if kl and kl not in seen:
        raise TaskConfigError(
            f"eval.kl_task={kl!r} is not one of the run's tasks: list it in eval.ref_tasks"
        )
    return parts


def data_dir_of(cfg: Any, required: bool = True) -> Path:
    """``cfg.paths.data_dir`` (else ``$GRADS_DATA_DIR``, else ``.`` when not ``required``), absolute."""
    paths = as_dict(cfg).get("paths") or {}
    root = paths.get("data_dir") or os.environ.get("GRADS_DATA_DIR")
    if not root and required:
        raise TaskConfigError("no data root: set paths.data_dir (or GRADS_DATA_DIR)")
    return Path(str(root or ".")).expanduser().resolve()


def include_dirs(cfg: Any) -> list[Path]:
    """The packaged task folder plus ``eval.include_paths`` (each must exist)."""
    dirs = [TASKS_DIR]
    for p in eval_settings(cfg)["include_paths"] or []:
        path = Path(str(p)).expanduser().resolve()
        if not path.is_dir():
            raise TaskConfigError(f"eval.include_paths: {path} is not a folder")
        dirs.append(path)
    return dirs


def synthetic_metadata(cfg: Any) -> dict[str, str]:
    """Materialise the synthetic domain's files and return their paths as task metadata.

    Uses ``domain.generator`` when the domain has one, else the default generator parameters
    under ``<cache_dir>/synthetic/seed0``.
    """
    from grads.data import synthetic

    cfg = as_dict(cfg)
    gen = dict((cfg.get("domain") or {}).get("generator") or {})
    out_dir = gen.pop("out_dir", None)
    if out_dir is None:
        cache = (cfg.get("paths") or {}).get("cache_dir") or "outputs/cache"
        out_dir = Path(str(cache)) / "synthetic" / f"seed{int(gen.get('seed', 0))}"
    paths = synthetic.materialise(out_dir, **gen)
    return {meta: str(paths[key]) for key, meta in SYNTHETIC_METADATA.items()}


def heldout_metadata(cfg: Any) -> dict[str, str]:
    """Write the run domain's held-out split (``grads.data.heldout``) and return its path as metadata.

    Raises:
        TaskConfigError: the domain has no ``heldout`` block or its split cannot be built.
    """
    from grads.data.heldout import HeldoutConfigError, materialise

    try:
        path = materialise(as_dict(cfg))
    except (HeldoutConfigError, ValueError, OSError) as exc:
        raise TaskConfigError(f"task 'grads_heldout': {exc}") from exc
    return {key: str(path) for key in HELDOUT_TASKS.values()}


def measured(cfg: Any) -> bool:
    """Whether a run scores the held-out split: its evaluate stage runs (``stages``,
    ``eval.enabled``) with a held-out task (``grads_heldout``) in ``eval.domain_loss_tasks``."""
    from grads.constants import STAGES

    if "evaluate" not in (cfg_get(cfg, "stages") or STAGES):
        return False
    ev = eval_settings(cfg)
    return bool(ev["enabled"]) and bool(set(HELDOUT_TASKS) & set(ev["domain_loss_tasks"] or []))


def resolve_for_run(cfg: dict) -> Any:
    """The ``domain.heldout`` value a run uses: a block with ``only_when_measured: true`` becomes
    the block without the flag when the run scores the split (:func:`measured`), else None. Any
    other value is returned as it is. ``cfg`` is the resolved run config (a plain dict)."""
    spec = (cfg.get("domain") or {}).get("heldout")
    if not isinstance(spec, dict) or spec.get("only_when_measured") is not True:
        return spec
    if not measured(cfg):
        return None
    return {k: v for k, v in spec.items() if k != "only_when_measured"}
