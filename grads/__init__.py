"""GrADS: gradient-aware data selection for domain SFT (arXiv 2511.08620) and its baselines.

Stages (one module each): ``data`` -> ``models`` -> ``training`` (warm-up) -> ``gradients`` /
``features`` -> ``selectors`` -> ``training`` (fine-tune) -> ``evaluation`` -> ``report``;
``pipeline`` chains them with a content-addressed cache. Heavy libraries (torch, deepspeed,
lm_eval) are imported inside functions so that composing a config stays instant.
"""

import os

# Before anything loads torch's OpenMP runtime: threads waiting at a barrier sleep instead of
# spinning. With the default spin-wait, any other process on the cores (a test run, a second job)
# made the pipeline's training step 4-6x slower in wall time (measured: SmolLM2 LoRA warm-up on the
# financial pool, 17-31 s vs 4.6-6.1 s per 8-sample step; RESULTS.md "Cost of selection"); on an
# idle machine the two are within noise. An explicit value (e.g. OMP_WAIT_POLICY=ACTIVE) wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
