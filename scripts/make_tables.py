"""Collect a sweep's metrics.json files into CSV/Markdown/LaTeX tables and plots.

Usage:
    python scripts/make_tables.py outputs/multirun/2026-11-23/12-00-00 --out results/paper_main
    python scripts/make_tables.py --from-csv results/paper_main/results.csv   # rebuild from the CSV
"""

from grads.report import main

if __name__ == "__main__":
    main()
