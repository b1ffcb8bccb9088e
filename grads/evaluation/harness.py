"""Task discovery, validation, per-task limits and in-process lm-eval runs.

The offline ``grads_*`` tasks live as YAML files in :mod:`grads.evaluation.tasks`; their data root is
never written in a YAML but passed at run time as ``TaskManager(metadata={"data_dir": ...})`` (the
loaders in ``tasks/utils.py`` read it). Any other name is looked up among lm-eval's built-in tasks,
so ``eval.tasks_from=hub`` (or a domain's ``eval_tasks_hub``) works for online users.

Limits. ``eval.limit`` is the default number of documents per *requested* task and
``eval.task_limits`` overrides it by name. A group's limit is split evenly (rounded up) over its
children, recursively, unless a child has its own override: ``grads_mmlu_general: 132`` evaluates 3
questions from each of its 44 subjects. A float in (0, 1) is a fraction of every leaf task instead.
Every ``grads_*`` evaluation split is shuffled with a fixed seed, so the first N documents are a
uniform sample. Limits are applied through ``simple_evaluate(samples={task: [0..N-1]})``.

This module is the evaluation harness's front door; each concern lives in its own module::

    settings     eval defaults and checks, task lists per metric part, data folders, metadata
    taskfiles    the index of local task YAMLs and their fingerprint
    limits       per-task document limits (groups split evenly)
    plan         prepare(): validated tasks -> Plan; validate_tasks()
    lm_eval_run  quiet logs, preserved RNG, in-memory HFLM, one simple_evaluate call
"""

from __future__ import annotations

from grads.config import as_dict
from grads.evaluation.limits import _count, _split, resolve_limits
from grads.evaluation.lm_eval_run import (
    hflm_class,
    preserved_rng,
    quiet_lm_eval,
    run_lm_eval,
    timed,
)
from grads.evaluation.plan import Plan, prepare, validate_tasks
from grads.evaluation.settings import (
    EVAL_DEFAULTS,
    HELDOUT_TASKS,
    SYNTHETIC_METADATA,
    SYNTHETIC_TASKS,
    TaskConfigError,
    data_dir_of,
    eval_settings,
    heldout_metadata,
    include_dirs,
    part_lists,
    synthetic_metadata,
    task_lists,
)
from grads.evaluation.taskfiles import TaskFile, _yaml_loader, scan_task_files, task_fingerprint

__all__ = [
    "EVAL_DEFAULTS",
    "HELDOUT_TASKS",
    "SYNTHETIC_METADATA",
    "SYNTHETIC_TASKS",
    "Plan",
    "TaskConfigError",
    "TaskFile",
    "_count",
    "_split",
    "_yaml_loader",
    "as_dict",
    "data_dir_of",
    "eval_settings",
    "heldout_metadata",
    "hflm_class",
    "include_dirs",
    "part_lists",
    "prepare",
    "preserved_rng",
    "quiet_lm_eval",
    "resolve_limits",
    "run_lm_eval",
    "scan_task_files",
    "synthetic_metadata",
    "task_fingerprint",
    "task_lists",
    "timed",
    "validate_tasks",
]
