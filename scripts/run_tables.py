"""Run the real-domain tables (RESULTS.md, "Protocol") for one domain, phase by phase.

Each phase is one ``grads -m`` sweep of ``experiment=paper_main`` or ``paper_ablation``; the phases,
their order and the decision rules between them are described in ``grads.paper.phases``. After every
phase the domain's runs are collected into ``results/tables/<domain>/``.

    python scripts/run_tables.py financial                       # every phase
    python scripts/run_tables.py financial --phases main_p5      # one phase
    python scripts/run_tables.py financial --dry-run             # print the commands
    python scripts/run_tables.py financial --status              # finished / planned jobs per phase
    python scripts/run_tables.py financial --collect-only        # re-collect what has finished
    python scripts/run_tables.py financial --views-only          # subset views from results/ only
"""

from grads.paper.phases import main

if __name__ == "__main__":
    main()
