"""Uniform random subset: the standard data-selection control.

Every valid row draws an i.i.d. ``U(0, 1)`` key from ``numpy.random.default_rng(seed)`` in table
order; the top-k keys form the subset, so for one seed a smaller budget is a prefix of a larger one
(p5 is nested in p10) and different seeds give independent subsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.selectors.base import Selection, select_by_score


@dataclass
class RandomSelector:
    """Uniformly random subset of the valid pool (rows with a finite ``loss``).

    Args:
        name: criterion label.
    """

    name: str = "random"
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    # Needs no model: its selection cost is the select stage alone (no warm-up, no features).
    model_free: ClassVar[bool] = True

    @property
    def columns(self) -> tuple[str, ...]:
        # A NaN loss marks a sample with no supervised tokens: nothing to train on.
        return ("loss",)

    def select(self, table: pd.DataFrame, budget: Any, seed: int) -> Selection:
        def score(arrays: dict[str, np.ndarray]) -> np.ndarray:
            return np.random.default_rng(seed).random(arrays["loss"].size)

        return select_by_score(
            self.name, table, budget, seed, self.columns, score, xlabel="random key U(0,1)"
        )
