"""RDS+ (Ivison et al. 2025, "Large-Scale Data Selection for Instruction Tuning").

Pool and target samples are embedded by the *base* model's final hidden states, mean-pooled with
position weights (the ``hidden`` pass of :mod:`grads.features.representations`), and compared by cosine
similarity. Selection is a round robin, so that no target task or example dominates the subset:

* ``round_robin: groups`` (the released code's multi-task selection): within each target group
  (an evaluation task) a pool sample scores its maximum similarity over that group's examples;
  groups then take turns, each adding its best remaining sample, until the budget is filled.
* ``round_robin: examples``: the same with every target example as its own group.

Each group's ranking is ``(-similarity, id)``; groups take turns in sorted-name order; a sample
already taken is skipped. The reported score of the ``r``-th pick is ``1 - r / k`` (the round robin
order, highest first); the similarity that won each pick is in the plot values.

Reproduced as released, with two choices stated: the position weights count attended tokens only
(the released script weights every position of a padded batch), and the whole chat-formatted
sample (prompt and response) is embedded, as RDS+ does by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.features.store import Representation
from grads.selectors.base import (
    Selection,
    base_diagnostics,
    finish,
    ids_at,
    need_representation,
    rank_top,
    representation_pool,
    resolve_size,
)
from grads.selectors.budget import parse_budget
from grads.selectors.less import group_index, unit_rows

ROUND_ROBIN = ("groups", "examples")


def group_max_similarity(
    pool: np.ndarray, target: np.ndarray, labels: np.ndarray, chunk_rows: int = 65536
) -> np.ndarray:
    """``[n, G]``: each pool row's maximum cosine over the target rows of each label (sorted)."""
    t = unit_rows(target)
    _, gi = group_index(labels)
    G = int(gi.max()) + 1
    out = np.empty((pool.shape[0], G), dtype=np.float32)
    for s in range(0, pool.shape[0], chunk_rows):
        sims = unit_rows(pool[s : s + chunk_rows]) @ t.T
        for g in range(G):
            out[s : s + chunk_rows, g] = sims[:, gi == g].max(axis=1)
    return out


def round_robin(
    scores: np.ndarray, k: int, ids_for: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Round-robin picks over the columns of ``scores`` (``[n, G]``), ``k`` in all.

    Each column only needs its own top ``k`` (ordered by ``(-score, id)``): if all of them were
    taken by other columns, ``k`` picks have been made already.

    Returns:
        ``(rows, won)``: picked rows in pick order and the score that won each pick.
    """
    n, G = scores.shape
    k = min(k, n)
    lists = [rank_top(scores[:, g], k, ids_for) for g in range(G)]
    ptr = [0] * G
    taken = np.zeros(n, dtype=bool)
    rows, won = [], []
    while len(rows) < k:
        for g in range(G):
            if len(rows) >= k:
                break
            lst = lists[g]
            while ptr[g] < lst.size and taken[lst[ptr[g]]]:
                ptr[g] += 1
            if ptr[g] < lst.size:
                r = int(lst[ptr[g]])
                taken[r] = True
                rows.append(r)
                won.append(float(scores[r, g]))
    return np.asarray(rows, dtype=np.int64), np.asarray(won)


@dataclass
class RDSSelector:
    """RDS+: round-robin cosine similarity of pooled base-model hidden states (module docstring).

    Args:
        name: criterion label.
        round_robin: ``groups`` (over target tasks, max within each) or ``examples``.
        chunk_rows: pool rows per matrix product.
    """

    name: str = "rds"
    round_robin: str = "groups"
    chunk_rows: int = 65536
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False
    representations: ClassVar[tuple[str, ...]] = ("hidden",)
    requires_target: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.round_robin not in ROUND_ROBIN:
            raise ValueError(f"RDSSelector: round_robin must be one of {ROUND_ROBIN}")

    @property
    def columns(self) -> tuple[str, ...]:
        return ("loss",)

    def select(
        self,
        table: pd.DataFrame,
        budget: Any,
        seed: int,
        reps: dict[str, Representation] | None = None,
    ) -> Selection:
        """Round-robin the valid pool over the target groups and keep the budget's k."""
        budget = parse_budget(budget)
        rep = need_representation(reps, "hidden", self.name, target=True)
        valid, rows, excluded = representation_pool(table, rep, self.columns, self.name)
        n = int(valid.size)
        k = resolve_size(budget, n, self.name, False)
        labels = (
            rep.target_groups
            if self.round_robin == "groups"
            else np.array([str(i) for i in rep.target_ids], dtype=object)
        )
        sims = group_max_similarity(rep.pool[rows], rep.target, labels, self.chunk_rows)
        picks, won = round_robin(sims, k, lambda local: ids_at(table, valid[local]))
        scores = np.zeros(n)
        scores[picks] = 1.0 - np.arange(picks.size) / picks.size  # pick order, positive
        diag = base_diagnostics(self.name, table, n, budget, k, seed, excluded)
        names, gi = group_index(rep.target_groups)
        diag.update(
            round_robin=self.round_robin,
            n_round_robin_columns=int(sims.shape[1]),
            target=(rep.meta.get("target") or {}).get("name"),
            target_size=int(rep.target.shape[0]),
            target_groups=dict(zip(names, np.bincount(gi).tolist())),
            pooling=rep.meta.get("pooling"),
            winning_similarity_min=float(won.min()) if won.size else None,
        )
        art = {
            "values": sims.max(axis=1).astype(np.float64),
            "selected_values": sims.max(axis=1)[picks].astype(np.float64),
            "xlabel": "RDS+ max cosine similarity to the target set",
        }
        return finish(table, scores, k, valid, diag, art)
