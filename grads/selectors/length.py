"""Length baseline: the longest responses (most supervised tokens).

A strong, cheap heuristic for instruction tuning ("Long Is More for Alignment", Zhao et al. 2024).
Lengths tie often; ties are broken by id like every other criterion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from grads.selectors.base import Selection, select_by_score


@dataclass
class LengthSelector:
    """Top-k by ``n_tokens`` (supervised response tokens).

    Args:
        name: criterion label.
    """

    name: str = "length"
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False

    @property
    def columns(self) -> tuple[str, ...]:
        # loss as well: a long response whose loss is NaN has no supervised tokens left.
        return ("n_tokens", "loss")

    def select(self, table: pd.DataFrame, budget: Any, seed: int) -> Selection:
        return select_by_score(
            self.name, table, budget, seed, self.columns, lambda a: a["n_tokens"], xlabel="n_tokens"
        )
