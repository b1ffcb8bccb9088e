"""LESS (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning").

Score of pool sample ``z`` against a target set split into groups (LESS: the subtasks of a target
task, e.g. MMLU subjects; here: the target set's sources)::

    Inf(z) = max_g mean_{z' in g} cos(g~(z), g(z'))

with ``g~(z)`` the projected, Adam-preconditioned LoRA gradient of ``z`` and ``g(z')`` the
projected plain gradient of target example ``z'`` (both unit-normalised, computed once by the
``lora_grads`` pass of :mod:`grads.features.representations`). The subset is the top-k by ``(-score, id)``.
``aggregate: max`` scores by the single most similar target example instead.

Not reproduced (see :mod:`grads.features.representations`): LESS warms up on a random 5% of the pool for 4
epochs and sums the similarity over the 4 epoch checkpoints weighted by their mean learning rate;
here the pipeline's one warm-up (GrADS's epoch over the whole pool) gives one checkpoint, and its
Adam state is the latest kept resumable checkpoint (not necessarily the last step), or absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.features.store import Representation
from grads.selectors.base import (
    Selection,
    base_diagnostics,
    finish,
    need_representation,
    representation_pool,
    resolve_size,
)
from grads.selectors.budget import parse_budget

AGGREGATES = ("max_mean", "max")


def group_index(groups: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sorted distinct group names and each row's group number."""
    names = sorted({str(g) for g in groups})
    lookup = {g: i for i, g in enumerate(names)}
    return names, np.array([lookup[str(g)] for g in groups], dtype=np.int64)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def less_scores(
    pool: np.ndarray,
    target: np.ndarray,
    groups: np.ndarray,
    aggregate: str = "max_mean",
    chunk_rows: int = 65536,
) -> np.ndarray:
    """LESS influence of every pool row (module docstring), in chunks of ``chunk_rows`` rows.

    Args:
        pool: ``[n, d]`` pool gradients (memory-mapped is fine; rows are read chunk by chunk).
        target: ``[m, d]`` target gradients. groups: ``[m]`` group label of each target row.
        aggregate: ``max_mean`` (LESS) or ``max``.

    Returns:
        float64 ``[n]``.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    t = unit_rows(target)
    _, gi = group_index(groups)
    # mean over each group's columns = sims @ M with M[j, g] = 1 / |g| for j in g
    counts = np.bincount(gi)
    mean_of = np.zeros((t.shape[0], counts.size), dtype=np.float32)
    mean_of[np.arange(t.shape[0]), gi] = 1.0 / counts[gi]
    out = np.empty(pool.shape[0], dtype=np.float64)
    for s in range(0, pool.shape[0], chunk_rows):
        sims = unit_rows(pool[s : s + chunk_rows]) @ t.T
        out[s : s + chunk_rows] = (sims @ mean_of if aggregate == "max_mean" else sims).max(axis=1)
    return out


@dataclass
class LessSelector:
    """LESS: gradient similarity to the domain's target set (module docstring).

    Args:
        name: criterion label.
        aggregate: ``max_mean`` (LESS: mean over each target group, max over groups) or ``max``.
        chunk_rows: pool rows scored per matrix product (bounds memory).
    """

    name: str = "less"
    aggregate: str = "max_mean"
    chunk_rows: int = 65536
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False
    representations: ClassVar[tuple[str, ...]] = ("lora_grads",)
    requires_target: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"LessSelector: aggregate must be one of {AGGREGATES}")

    @property
    def columns(self) -> tuple[str, ...]:
        return ("loss",)  # a NaN loss marks a sample with no supervised token

    def select(
        self,
        table: pd.DataFrame,
        budget: Any,
        seed: int,
        reps: dict[str, Representation] | None = None,
    ) -> Selection:
        """Score the valid pool against the target gradients and keep the budget's top-k."""
        budget = parse_budget(budget)
        rep = need_representation(reps, "lora_grads", self.name, target=True)
        valid, rows, excluded = representation_pool(table, rep, self.columns, self.name)
        n = int(valid.size)
        k = resolve_size(budget, n, self.name, False)
        scores = less_scores(
            rep.pool[rows], rep.target, rep.target_groups, self.aggregate, self.chunk_rows
        )
        diag = base_diagnostics(self.name, table, n, budget, k, seed, excluded)
        names, gi = group_index(rep.target_groups)
        diag.update(
            aggregate=self.aggregate,
            target=(rep.meta.get("target") or {}).get("name"),
            target_size=int(rep.target.shape[0]),
            target_groups=dict(zip(names, np.bincount(gi).tolist())),
            representation={k_: rep.meta.get(k_) for k_ in ("preconditioning", "projection")}
            | {"proj_dim": int(rep.pool.shape[1])},
        )
        art = {"values": scores, "xlabel": f"LESS influence ({self.aggregate} cosine)"}
        return finish(table, scores, k, valid, diag, art)
