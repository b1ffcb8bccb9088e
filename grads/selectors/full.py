"""The full pool: fine-tune on every usable sample (the paper's "full data" reference row).

The budget is recorded but ignored: ``full`` always keeps the whole valid pool, so it is usually
launched with ``budget=p100`` (or ``auto``). Rows with a non-finite ``loss`` (no supervised tokens
left after truncation) are still excluded and counted, since they carry no training signal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.selectors.base import Selection, select_by_score
from grads.selectors.budget import Budget, parse_budget

log = logging.getLogger(__name__)


@dataclass
class FullSelector:
    """Every valid row, ranked by id (all scores are 0).

    Args:
        name: criterion label.
    """

    name: str = "full"
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = True
    # The pipeline drops the budget from this selector's cache key: every budget gives the same run.
    budget_free: ClassVar[bool] = True
    # Needs no model: its selection cost is the select stage alone (no warm-up, no features).
    model_free: ClassVar[bool] = True

    @property
    def columns(self) -> tuple[str, ...]:
        return ("loss",)

    def select(self, table: pd.DataFrame, budget: Any, seed: int) -> Selection:
        requested = parse_budget(budget)
        if not (requested.is_auto or (requested.kind == "fraction" and requested.value == 1.0)):
            log.info("full: ignoring budget %s, keeping the whole valid pool", requested.name)
        return select_by_score(
            self.name,
            table,
            Budget("auto", name=requested.name),
            seed,
            self.columns,
            lambda arrays: np.zeros(arrays["loss"].size),
            xlabel="score (constant)",
            supports_auto=True,
            extra={"requested_budget": requested.to_dict()},
        )
