"""Turn a sweep's runs into tables and plots: the general tools under the paper's tables.

* :mod:`~grads.report.collect`: every job's ``metrics.json`` as one row (failed jobs listed, never
  fatal), the collected CSVs and their per-item results read back.
* :mod:`~grads.report.tables`: mean ± std over seeds per method and budget, Markdown and LaTeX.
* :mod:`~grads.report.paired`: each method paired with a reference method on the same items and
  seeds, the mean difference with its bootstrap 95 % CI (▲ / ▼ for significant wins / losses).
* :mod:`~grads.report.plots`, :mod:`~grads.report.costs`, :mod:`~grads.report.noise`: the figures,
  the cost tables and the evaluation's noise floor.

The paper's protocol on top of these (which runs make Table 1 and Table 2, the decisions, the
document ``grads-report`` writes) is :mod:`grads.paper`.
"""

from grads.report.collect import collect, read_csvs, read_items, write_items
from grads.report.costs import cost_model, cost_table
from grads.report.noise import noise_floor_report
from grads.report.paired import PAIRED_METRICS, paired_cell, paired_tables
from grads.report.plots import forest_plot, headline_plot, plots
from grads.report.tables import latex, markdown, paper_tables

__all__ = [
    "PAIRED_METRICS",
    "collect",
    "cost_model",
    "cost_table",
    "forest_plot",
    "headline_plot",
    "latex",
    "markdown",
    "noise_floor_report",
    "paired_cell",
    "paired_tables",
    "paper_tables",
    "plots",
    "read_csvs",
    "read_items",
    "write_items",
]
