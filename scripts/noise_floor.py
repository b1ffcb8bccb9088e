"""Measure the evaluation's noise floor: the base model and ``random`` at 5 % over several seeds.

The protocol and its model-free shortcut (a forward-only features table, enough for the random
selector) are described in ``grads.paper.noise_floor``. Each stage is cached, so a rerun resumes.

Usage (nice'd, in the background):
    nohup nice -n 10 python scripts/noise_floor.py run --domain medical > noise.log 2>&1 &
    python scripts/noise_floor.py analyse outputs/noise_floor/medical/runs --out results/noise_floor_medical
    python scripts/noise_floor.py analyse --from-csv results/noise_floor_medical/results.csv
"""

from grads.paper.noise_floor import main

if __name__ == "__main__":
    raise SystemExit(main())
