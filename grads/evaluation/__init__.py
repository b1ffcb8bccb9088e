"""Evaluation with lm-eval: domain gain and forgetting of general ability.

* :func:`evaluate` - score an in-memory model on domain and general tasks.
* :func:`run_evaluate` - the pipeline stage: tuned vs. cached base model -> ``metrics.json`` with
  ``domain_acc``, ``general_acc``, ``domain_gain`` and ``forgetting``, the continuous metrics
  (``domain_loss``/``domain_bpb`` on the held-out split, ``ref_nll``, ``text_bpb``, ``general_kl``,
  ``general_acc_norm``; :mod:`.metrics`) and the per-item results of both models (:mod:`.items`).
* :func:`validate_tasks` - fail before any model is loaded if a task cannot run.
* :mod:`.stats` - paired bootstrap CIs over items and seeds, noise floor, minimum detectable
  difference (used by ``grads.report``).

The offline tasks (``grads_*``) are YAML files in :mod:`grads.evaluation.tasks`; any lm-eval
built-in task name works too. Heavy imports (lm_eval, torch) happen inside the functions.
"""

from grads.evaluation.limits import resolve_limits
from grads.evaluation.metrics import (
    ITEM_METRICS,
    compare,
    item_summary,
    mean_score,
    summarise,
    task_scores,
)
from grads.evaluation.plan import prepare, validate_tasks
from grads.evaluation.runner import base_cache_key, evaluate, run_evaluate
from grads.evaluation.settings import (
    EVAL_DEFAULTS,
    TaskConfigError,
    eval_settings,
    part_lists,
    task_lists,
)
from grads.evaluation.taskfiles import scan_task_files
from grads.evaluation.tasks import TASKS_DIR

__all__ = [
    "EVAL_DEFAULTS",
    "ITEM_METRICS",
    "TASKS_DIR",
    "TaskConfigError",
    "base_cache_key",
    "compare",
    "eval_settings",
    "evaluate",
    "item_summary",
    "mean_score",
    "part_lists",
    "prepare",
    "resolve_limits",
    "run_evaluate",
    "scan_task_files",
    "summarise",
    "task_lists",
    "task_scores",
    "validate_tasks",
]
