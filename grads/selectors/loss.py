"""Loss-based baselines: the highest-loss (hardest) or lowest-loss (easiest) samples.

Scores are the per-sample mean token loss of the warm-up model, ``l_i = -(1/T_i) sum_t log
p(y_t | y_<t, x)``. High loss is the classic "learn what is not yet learnt" heuristic (cf. EL2N,
Paul et al. 2021, which ranks by the error norm early in training); low loss keeps the samples the
model already fits, a forgetting-averse control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from grads.selectors.base import Selection, select_by_score

ORDERS = ("high", "low")


@dataclass
class LossSelector:
    """Top-k by warm-up loss.

    Args:
        order: ``high`` keeps the largest losses, ``low`` the smallest.
        name: criterion label (``loss_high`` / ``loss_low`` by default).
    """

    order: str = "high"
    name: str | None = None
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"loss selector order must be one of {ORDERS}, got {self.order!r}")
        if self.name is None:
            self.name = f"loss_{self.order}"

    @property
    def columns(self) -> tuple[str, ...]:
        return ("loss",)

    def select(self, table: pd.DataFrame, budget: Any, seed: int) -> Selection:
        sign = 1.0 if self.order == "high" else -1.0
        return select_by_score(
            self.name,
            table,
            budget,
            seed,
            self.columns,
            lambda a: sign * a["loss"],
            xlabel="loss" if sign > 0 else "-loss",
            extra={"order": self.order},
        )
