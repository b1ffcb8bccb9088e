"""Collect a sweep's metrics.json files into CSV/Markdown/LaTeX tables and plots.

Besides the paper-layout table (mean ± std over seeds) it prints, per domain, the paired comparison
of every method with a reference method (default ``random``) at the same budget and seeds: the mean
paired difference of the headline metrics with a bootstrap 95 % CI over items and seeds, ▲ / ▼ for
significant wins / losses (see ``grads.paper.tables`` and ``grads.report``).

Usage:
    python scripts/make_tables.py outputs/multirun/2026-11-23/12-00-00 --out results/paper_main
    python scripts/make_tables.py --from-csv results/paper_main/results.csv   # rebuild from the CSV
    python scripts/make_tables.py <sweep> --reference random --paired-metrics domain_bpb general_kl
"""

from grads.paper.tables import main

if __name__ == "__main__":
    main()
