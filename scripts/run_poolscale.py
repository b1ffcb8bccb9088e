"""The paper's question at ten times the pool: the whole financial pool and a budget curve.

Phases (warm-up and features, 5 % for random / grads / grads_paper / the strongest baseline, full,
extra seeds, the 1-25 % curve, the 1,000-pool bridge under the same precision, selection stability
under a second warm-up seed) are described in ``grads.paper.poolscale``; each is one ``grads -m``
sweep that resumes from the stage cache, collected into ``results/poolscale/financial_pool/``.

    python scripts/run_poolscale.py                        # every phase, in order
    python scripts/run_poolscale.py --phases main_p5 full  # some phases
    python scripts/run_poolscale.py --dry-run              # print the commands
    python scripts/run_poolscale.py --collect-only         # re-collect what has finished
    python scripts/run_poolscale.py --status               # which jobs are done, started, pending
    python scripts/run_poolscale.py --phases features features.chunk_size=1024   # with overrides
"""

from grads.paper.poolscale import main

if __name__ == "__main__":
    main()
