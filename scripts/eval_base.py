"""Evaluate the BASE model on each domain's tasks and on the general suite; print a table.

Composes the pipeline's config, so task lists, limits and cache keys are those of
``grads eval=<suite> domain=<d>``; the results land in the base-model cache, which later pipeline
runs reuse (see ``grads.paper.eval_base``).

Usage:
    python scripts/eval_base.py --suite quick                       # SmolLM2-135M, 3 domains
    python scripts/eval_base.py --suite quick --domains medical --fresh
    python scripts/eval_base.py --suite quick --override eval.limit=4 model=tiny
"""

from grads.paper.eval_base import main

if __name__ == "__main__":
    raise SystemExit(main())
