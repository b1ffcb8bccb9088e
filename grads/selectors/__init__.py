"""Selection criteria over the features table: GrADS (KDE over the gradient signal) and baselines.

One module per criterion, all behind the :class:`~grads.selectors.base.Selector` protocol
(``select(table, budget, seed) -> Selection``) and instantiated from ``conf/selector/<name>.yaml``:

* ``grads``, ``grads_*``: :class:`~grads.selectors.grads_kde.GradsSelector`, a KDE rule over the
  combined embedding / LM-head gradient signal (arXiv 2511.08620);
* ``random``: :class:`~grads.selectors.random.RandomSelector`, uniform;
* ``full``: :class:`~grads.selectors.full.FullSelector`, the whole valid pool;
* ``loss_high`` / ``loss_low``: :class:`~grads.selectors.loss.LossSelector`, warm-up loss;
* ``gradnorm``: :class:`~grads.selectors.gradnorm.GradNormSelector`, sqrt(embed^2 + lm_head^2);
* ``length``: :class:`~grads.selectors.length.LengthSelector`, supervised tokens;
* ``ifd``: :class:`~grads.selectors.ifd.IFDSelector`, Cherry LLM's IFD.

Budgets (``conf/budget/``) are parsed by :func:`~grads.selectors.budget.parse_budget`; the stage
entry point is :func:`~grads.selectors.stage.run_select`.
"""

from grads.selectors.base import Selection, Selector
from grads.selectors.budget import Budget, parse_budget

__all__ = ["Budget", "Selection", "Selector", "parse_budget"]
