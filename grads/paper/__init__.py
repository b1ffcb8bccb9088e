"""The paper's protocol at CPU scale: what runs, in which order, how it is decided and reported.

Built on the general tools of :mod:`grads.report` (collection, mean ± std and paired tables, plots);
``scripts/`` holds one thin entry point per command.

* :mod:`~grads.paper.protocol`: the grids of ``conf/experiment/paper_main.yaml`` (Table 1) and
  ``paper_ablation.yaml`` (Table 2), and how runs are named (``grads.<rule>.<source>``, the default's
  cell, the cheap variants).
* :mod:`~grads.paper.frames`: the runs as collected, named under the current ``grads`` default;
  Table 1's and Table 2's runs.
* :mod:`~grads.paper.decisions`: the strongest baselines, the best Table 2 cell, Table 2 across
  domains and its leader, the default decision.
* :mod:`~grads.paper.tables`: the document ``grads-report`` / ``scripts/make_tables.py`` writes.
* :mod:`~grads.paper.phases`: the phases of ``scripts/run_tables.py`` (overrides, plan, status,
  the runner); :mod:`~grads.paper.publish`: a domain's runs into ``results/``;
  :mod:`~grads.paper.views`: what the selected subsets are made of;
  :mod:`~grads.paper.results_md`: RESULTS.md's links to the generated tables.
* Measurements beside the tables: :mod:`~grads.paper.reproduce` (re-run one cell against its CI),
  :mod:`~grads.paper.noise_floor`, :mod:`~grads.paper.eval_base` (the base model's scores),
  :mod:`~grads.paper.pool_stats` (pool sizes and lengths).
"""
