"""Gradient-norm baseline (GraNd-like): the samples with the largest gradient.

GraNd (Paul et al. 2021, "Deep Learning on a Data Diet") scores a sample by the expected norm of
its loss gradient early in training, ``E ||g_i||``. We use the warm-up model's gradient restricted
to the two matrices GrADS reads, ``s_i = sqrt(||dL_i/dE||_F^2 + ||dL_i/dW||_F^2)``, i.e. the
Frobenius norm of the concatenated (embedding, LM-head) gradient, and keep the largest. Unlike
GrADS there is no density model: it is pure magnitude on the raw scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.selectors.base import Selection, select_by_score


@dataclass
class GradNormSelector:
    """Top-k by ``sqrt(embed^2 + lm_head^2)``.

    Args:
        name: criterion label.
    """

    name: str = "gradnorm"
    requires: ClassVar[tuple[str, ...]] = ()
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False

    @property
    def columns(self) -> tuple[str, ...]:
        return ("embed", "lm_head")

    def select(self, table: pd.DataFrame, budget: Any, seed: int) -> Selection:
        return select_by_score(
            self.name,
            table,
            budget,
            seed,
            self.columns,
            lambda a: np.hypot(a["embed"], a["lm_head"]),
            xlabel="sqrt(embed^2 + lm_head^2)",
        )
