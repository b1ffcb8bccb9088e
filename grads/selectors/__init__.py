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
* ``ifd``: :class:`~grads.selectors.ifd.IFDSelector`, Cherry LLM's IFD;
* ``grads_paper`` / ``grads_cover``: :class:`~grads.selectors.grads_joint.JointDensitySelector`, a 2-D
  joint KDE over the two log gradient norms (highest density first), and the coverage-aware variant
  that suppresses near-duplicates in a representation space;
* ``less``: :class:`~grads.selectors.less.LessSelector`, LESS's gradient similarity to a target set;
* ``rds``: :class:`~grads.selectors.rds.RDSSelector`, RDS+'s hidden-state similarity, round robin.

Selectors that read per-sample representations (``less``, ``rds``, ``grads_cover``) declare
``representations`` (and ``requires_target``); the features stage then computes those passes
(:mod:`grads.features.representations`) over the pool and the domain's target set (:mod:`grads.data.targets`), and
the select stage hands them to ``select(..., reps=...)``. :func:`~grads.selectors.base.traits` reads
these declarations, with explicit defaults, for every selector.

Budgets (``conf/budget/``) are parsed by :func:`~grads.selectors.budget.parse_budget`; the stage
entry point is :func:`~grads.selectors.stage.run_select`.
"""

from grads.features.store import Representation
from grads.selectors.base import RepresentationSelector, Selection, Selector, Traits, traits
from grads.selectors.budget import Budget, parse_budget

__all__ = [
    "Budget",
    "Representation",
    "RepresentationSelector",
    "Selection",
    "Selector",
    "Traits",
    "parse_budget",
    "traits",
]
