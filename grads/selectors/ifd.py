"""Instruction-Following Difficulty (IFD) baseline, Cherry LLM.

Li et al. 2024, "From Quantity to Quality: Boosting LLM Performance with Self-Guided Data
Selection for Instruction Tuning" (NAACL), define for an instruction Q and answer A

    IFD(Q, A) = s(A | Q) / s(A),   s(.) = mean token cross-entropy of the answer,

i.e. how much the instruction fails to help the model predict the answer. They keep the highest
IFD samples but first drop ``IFD >= 1`` (the instruction does not help at all: misaligned pairs).
The ``ifd`` column is produced by the features stage only when asked (``features.ifd``), which is
why this selector declares ``requires = ("ifd",)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from grads.selectors.base import (
    Selection,
    base_diagnostics,
    check_columns,
    column,
    finish,
    log_exclusions,
    resolve_size,
    take,
    valid_rows,
)
from grads.selectors.budget import Budget, parse_budget


@dataclass
class IFDSelector:
    """Top-k by IFD among samples with ``ifd < max_ifd``.

    Args:
        max_ifd: Cherry LLM's filter: samples with ``ifd >= max_ifd`` are excluded (counted as
            ``ifd_ge_max``). ``1.0`` reproduces the paper; ``null`` disables the filter.
        name: criterion label.

    Fraction budgets resolve against the valid pool *before* the IFD filter (so p5 means 5% of
    the data set, as for every other selector); if fewer samples pass the filter than the budget
    asks for, selection fails with a message instead of back-filling with filtered samples.
    """

    max_ifd: float | None = 1.0
    name: str = "ifd"
    requires: ClassVar[tuple[str, ...]] = ("ifd",)
    supports_auto: ClassVar[bool] = False
    budget_free: ClassVar[bool] = False
    model_free: ClassVar[bool] = False

    @property
    def columns(self) -> tuple[str, ...]:
        return ("ifd",)

    def select(self, table: pd.DataFrame, budget: Any, seed: int) -> Selection:
        return self._select(table, parse_budget(budget), seed)

    def ranking(self, table: pd.DataFrame, seed: int) -> Selection:
        """Every sample that passes the IFD filter, ranked (``select.balance`` cuts it per class);
        ``n_valid`` in its diagnostics is the pool a fraction budget resolves against."""
        return self._select(table, Budget("fraction", 1.0, name="all"), seed, every_eligible=True)

    def _select(
        self, table: pd.DataFrame, budget: Budget, seed: int, every_eligible: bool = False
    ) -> Selection:
        check_columns(table, self.columns, self.name)
        ifd = column(table, "ifd")
        valid, excluded = valid_rows({"ifd": ifd})
        n_valid = len(table) if valid is None else valid.size
        if n_valid == 0:
            raise ValueError(
                f"ifd: {len(table)} of {len(table)} samples have no IFD (NaN). With "
                "features.ifd_answer=text a one-token answer scores nothing alone when the "
                "tokenizer adds no BOS (SmolLM2's); features.ifd_answer=matched scores it"
            )
        k = resolve_size(budget, n_valid, self.name, self.supports_auto)
        ifd = take(ifd, valid)
        if self.max_ifd is not None:
            keep = np.flatnonzero(ifd < self.max_ifd)
            excluded["ifd_ge_max"] = int(ifd.size - keep.size)
            excluded["total"] += excluded["ifd_ge_max"]
            valid = keep if valid is None else valid[keep]
            ifd = ifd[keep]
        log_exclusions(self.name, excluded, len(table))
        if every_eligible:
            k = int(ifd.size)
        if ifd.size < k:
            raise ValueError(
                f"ifd: budget {budget.name} asks for {k} samples but only {ifd.size} of {n_valid} "
                f"valid samples have IFD < {self.max_ifd}; use a smaller budget or max_ifd=null"
            )
        diag = base_diagnostics(self.name, table, n_valid, budget, k, seed, excluded)
        diag.update(max_ifd=self.max_ifd, n_eligible=int(ifd.size))
        return finish(table, ifd, k, valid, diag, {"values": ifd, "xlabel": "IFD"})
