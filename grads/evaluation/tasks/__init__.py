"""lm-eval task YAMLs for GrADS (``grads_*``) and their offline loaders (:mod:`.utils`).

Pass this folder to ``lm_eval.tasks.TaskManager(include_path=...)`` together with
``metadata={"data_dir": <data root>}``; :func:`grads.evaluation.task_manager` does both.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
