"""Does selection help on *this* pool? A paired verdict against random (``grads-verdict``).

Whether a selector beats a random subset depends on the pool (RESULTS.md: the same rule wins on one
domain, ties on another and fails on a third), so a practitioner cannot trust one blindly. The
verdict answers the question on the user's own pool, with the protocol of the paper tables::

    grads-verdict domain=custom domain.path=pool.jsonl verdict.selectors=[grads,grads_paper]

1. **Held-out split first.** A domain without one (``domain=custom``) sets
   ``min(300, 10 % of the pool)`` distinct samples aside (:mod:`grads.data.heldout`, chosen by content
   hash, removed from every pool the jobs build); ``verdict.heldout=N`` sets another size. Built-in
   domains keep their own split.
2. **Jobs.** Each compared selector and the reference (``verdict.against``, default ``random``) run
   the whole pipeline at seeds ``seed .. seed + verdict.seeds - 1``; the reference runs at the size of
   each compared subset. ``warmup.seed`` is pinned, so every job after the first reads the warm-up and
   the features from the stage cache (:mod:`grads.verdict.plan`).
3. **Evaluation** (``verdict.eval=lean``): only what the verdict reads, held-out bits per byte
   (``domain_bpb``, the domain's held-out split) and KL(base || tuned) on the general reference
   answers (``general_kl``, AlpacaEval), the composed suite's items and limits otherwise.
4. **Verdict** (:mod:`grads.verdict.analysis`): per compared selector, the paired difference
   (selector - reference) over the seeds both ran and the items both evaluated, with its 95 %
   bootstrap CI (:func:`grads.evaluation.stats.paired_bootstrap`), and the minimum detectable
   difference of the run from the reference's seeds (:func:`grads.evaluation.stats.noise_floor`).
   In words: *beats / ties / worse than random* on held-out domain loss, *forgets less / as much /
   more*. When the MDD exceeds the effect of fine-tuning itself (``|random - base|`` in held-out
   bpb) the verdict says the pool is too small to tell, instead of guessing.
5. **Outputs** in the run folder: ``verdict.json``, ``verdict.png`` (each selector's paired
   difference with its CI, the reference at zero; bpb and KL panels), ``jobs/<job>/`` (each
   pipeline job's ``metrics.json``) and, with ``verdict.export=winner``, the winning subset's export
   (:mod:`grads.export`, unchanged) with a ``verdict`` key added to its ``export.json`` and
   ``verdict.json`` beside it. The cost is estimated up front and measured at the end
   (:mod:`grads.verdict.cost`).
"""

from __future__ import annotations

from grads.verdict.settings import VerdictSettings, verdict_settings

__all__ = ["VerdictSettings", "verdict_settings"]
