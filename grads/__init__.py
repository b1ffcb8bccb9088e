"""GrADS: gradient-aware data selection for domain SFT (arXiv 2511.08620) and its baselines.

Stages (one module each): ``data`` -> ``models`` -> ``training`` (warm-up) -> ``gradients`` /
``features`` -> ``selectors`` -> ``training`` (fine-tune) -> ``evaluation`` -> ``report``;
``pipeline`` chains them with a content-addressed cache. Heavy libraries (torch, deepspeed,
lm_eval) are imported inside functions so that composing a config stays instant.
"""

__version__ = "0.1.0"
