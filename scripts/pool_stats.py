"""Print each domain's train-pool size and token-length distribution under a model's chat template.

Usage: python scripts/pool_stats.py [--domains medical legal financial synthetic] [--max-seq-len 4096]
"""

from grads.paper.pool_stats import main

if __name__ == "__main__":
    main()
