"""Selection budgets: how many samples a selector keeps.

A budget is a fraction of the pool (the paper reports 5% ... 50% subsets, arXiv 2511.08620), an
absolute count, or ``auto`` (the selector chooses its own size, e.g. GrADS' adaptive KDE threshold).
Configs live in ``conf/budget/<name>.yaml``; :func:`parse_budget` also accepts short strings
(``p5``, ``n1000``, ``0.05``, ``100``, ``auto``) for scripts and notebooks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from grads.constants import budget_label
from grads.errors import UserError

KINDS = ("fraction", "count", "auto")


class BudgetError(UserError, ValueError):
    """A budget that is malformed or that the pool cannot satisfy (the message names the value)."""


@dataclass(frozen=True)
class Budget:
    """A validated selection budget.

    Args:
        kind: ``fraction`` (``value`` in (0, 1] of the pool), ``count`` (``value`` samples) or
            ``auto`` (no value; only for selectors that pick their own size).
        value: the fraction or the count; ``None`` for ``auto``.
        name: short label used in paths, tables and W&B tags (``p5``, ``n1000``, ``auto``);
            derived from ``kind``/``value`` when omitted.

    Raises:
        BudgetError: on an unknown kind, a missing/extra value, a fraction outside (0, 1] or a
            count below 1, with the offending value in the message.
    """

    kind: str
    value: float | int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BudgetError(f"budget kind must be one of {KINDS}, got {self.kind!r}")
        value = self.value
        if self.kind == "auto":
            if value is not None:
                raise BudgetError(f"budget kind 'auto' takes no value, got value={value!r}")
        elif value is None or isinstance(value, bool) or not isinstance(value, int | float):
            raise BudgetError(f"budget kind {self.kind!r} needs a numeric value, got {value!r}")
        elif self.kind == "fraction":
            if not (math.isfinite(value) and 0 < value <= 1):
                raise BudgetError(
                    f"fraction budget must be in (0, 1] (a share of the pool), got {value!r}; "
                    "use kind=count for an absolute number of samples"
                )
            object.__setattr__(self, "value", float(value))
        else:  # count
            if not (math.isfinite(value) and float(value).is_integer()):
                raise BudgetError(f"count budget must be a whole number, got {value!r}")
            if value < 1:
                raise BudgetError(f"count budget must be >= 1 sample, got {value!r}")
            object.__setattr__(self, "value", int(value))
        if self.name is None:
            object.__setattr__(self, "name", _default_name(self.kind, self.value))

    @property
    def is_auto(self) -> bool:
        return self.kind == "auto"

    def resolve(self, n_pool: int) -> int:
        """Number of samples to select from a pool of ``n_pool``.

        Fractions round *up* (``ceil``, with a 1e-9 guard against float noise such as
        ``0.07 * 100 = 7.000000000000001``), so any positive fraction of a non-empty pool keeps
        at least one sample.

        Raises:
            BudgetError: for an empty pool, a count larger than the pool, or ``auto`` (which only
                a selector that chooses its own size can resolve).
        """
        if n_pool < 1:
            raise BudgetError(f"budget {self.name}: the pool is empty (0 valid samples)")
        if self.kind == "auto":
            raise BudgetError(
                "budget 'auto' cannot be resolved to a size by itself: only selectors that pick "
                "their own size accept it (selector=grads_adaptive or selector=full)"
            )
        if self.kind == "count":
            if self.value > n_pool:
                raise BudgetError(
                    f"count budget {self.name} asks for {self.value} samples but the pool has only "
                    f"{n_pool} valid samples; use a smaller count or a fraction"
                )
            return int(self.value)
        return min(n_pool, max(1, math.ceil(self.value * n_pool - 1e-9)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "name": self.name}


def _default_name(kind: str, value: float | int | None) -> str:
    return budget_label(kind, value)  # the one definition: conf/budget's labels use it too


_SHORT = re.compile(r"^(?:(?P<p>p)(?P<pv>\d+(?:\.\d+)?)|(?P<n>n)(?P<nv>\d+))$")


def parse_budget(spec: Budget | Mapping | str | float | int) -> Budget:
    """Build a :class:`Budget` from a config mapping, a short string or a number.

    Accepted: a ``Budget``; a mapping / DictConfig ``{kind, value, name}`` (a ``_target_`` key is
    ignored); ``"p5"`` (5%), ``"n1000"`` (1000 samples), ``"auto"``; a float in (0, 1] (fraction)
    or an int >= 1 (count).

    Raises:
        BudgetError: on anything else, naming what was given.
    """
    if isinstance(spec, Budget):
        return spec
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "auto":
            return Budget("auto")
        m = _SHORT.match(s)
        if m and m.group("p"):
            return Budget("fraction", float(m.group("pv")) / 100, name=s)
        if m and m.group("n"):
            return Budget("count", int(m.group("nv")), name=s)
        try:
            num = float(s)
        except ValueError:
            raise BudgetError(
                f"cannot parse budget {spec!r}: expected p<percent>, n<count>, auto or a number"
            ) from None
        return parse_budget(int(num) if num.is_integer() and num > 1 else num)
    if isinstance(spec, bool):
        raise BudgetError(f"cannot parse budget {spec!r}")
    if isinstance(spec, int):
        return Budget("count", spec)
    if isinstance(spec, float):
        return Budget("fraction", spec)
    if hasattr(spec, "keys"):
        d = {str(k): spec[k] for k in spec if str(k) != "_target_"}
        unknown = set(d) - {"kind", "value", "name"}
        if unknown:
            raise BudgetError(f"unknown budget keys {sorted(unknown)}; expected kind, value, name")
        if "kind" not in d:
            raise BudgetError(f"budget config needs a 'kind' ({', '.join(KINDS)}), got {d}")
        return Budget(d["kind"], d.get("value"), d.get("name"))
    raise BudgetError(f"cannot parse budget of type {type(spec).__name__}: {spec!r}")
