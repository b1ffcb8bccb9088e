"""Per-task document limits: a group's limit is split evenly (rounded up) over its members, a
fraction applies to every leaf (see :mod:`grads.evaluation`).
"""

from __future__ import annotations

import math
from typing import Any


def _split(limit: int | float | None, k: int) -> int | float | None:
    if limit is None or (isinstance(limit, float) and 0 < limit < 1) or k <= 0:
        return limit
    return math.ceil(limit / k)


def _count(limit: int | float | None, n_docs: int) -> int:
    if limit is None:
        return n_docs
    if isinstance(limit, float) and 0 < limit < 1:
        return min(n_docs, math.ceil(limit * n_docs))
    return min(n_docs, int(limit))


def resolve_limits(
    objects: dict[str, Any], default: int | float | None, overrides: dict[str, int | float | None]
) -> dict[str, int]:
    """Number of documents to evaluate per leaf task (see the module docstring for the rules).

    Args:
        objects: requested name -> loaded lm-eval ``Task`` or ``Group``.
        default: the default limit of a requested name (``eval.limit``).
        overrides: name (task or group, at any depth) -> limit (``eval.task_limits``).

    Returns:
        leaf task name -> number of documents (the first N of its shuffled evaluation split).
    """
    from lm_eval.api.group import Group

    out: dict[str, int] = {}

    def visit(obj: Any, limit: int | float | None) -> None:
        name = obj.name if isinstance(obj, Group) else obj.task_name
        limit = overrides.get(name, limit)
        if isinstance(obj, Group):
            children = list(obj)
            for child in children:
                visit(child, _split(limit, len(children)))
        else:
            out[name] = _count(limit, len(obj.eval_docs))

    for name, obj in objects.items():
        visit(obj, overrides.get(name, default))
    return out
