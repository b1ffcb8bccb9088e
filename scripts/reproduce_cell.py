"""Re-run one cell of the committed real-domain tables and check it lands inside its reported CI.

The cell is trained and evaluated again in a scratch cache (seeded with its warm-up and features
entries from ``--cache-from`` unless ``--from-scratch``) and paired with the committed reference
run as the tables pair them (see ``grads.paper.reproduce``). Exit status 0 when the re-run lies
inside the committed 95 % CI for every paired metric, 1 otherwise.

    python scripts/reproduce_cell.py financial grads_paper --cache-from outputs/cache
    python scripts/reproduce_cell.py financial grads.density.embed --from-scratch
"""

import sys

from grads.paper.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
