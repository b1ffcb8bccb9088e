"""Evaluation with lm-eval: domain gain and forgetting of general ability.

* :func:`evaluate` - score an in-memory model on domain and general tasks.
* :func:`run_evaluate` - the pipeline stage: tuned vs. cached base model -> ``metrics.json`` with
  ``domain_acc``, ``general_acc``, ``domain_gain`` and ``forgetting``.
* :func:`validate_tasks` - fail before any model is loaded if a task cannot run.

The offline tasks (``grads_*``) are YAML files in :mod:`grads.evaluation.tasks`; any lm-eval
built-in task name works too. Heavy imports (lm_eval, torch) happen inside the functions.
"""

from grads.evaluation.harness import (
    EVAL_DEFAULTS,
    TaskConfigError,
    eval_settings,
    prepare,
    resolve_limits,
    scan_task_files,
    task_lists,
    validate_tasks,
)
from grads.evaluation.metrics import compare, mean_score, summarise, task_scores
from grads.evaluation.runner import base_cache_key, evaluate, run_evaluate
from grads.evaluation.tasks import TASKS_DIR

__all__ = [
    "EVAL_DEFAULTS",
    "TASKS_DIR",
    "TaskConfigError",
    "base_cache_key",
    "compare",
    "eval_settings",
    "evaluate",
    "mean_score",
    "prepare",
    "resolve_limits",
    "run_evaluate",
    "scan_task_files",
    "summarise",
    "task_lists",
    "task_scores",
    "validate_tasks",
]
