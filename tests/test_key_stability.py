"""Stage keys of a representative set of configs are pinned (``tests/stage_keys.json``).

A refactor of the config groups (``tuning``, ``trainer``, the paper experiment base), of the stage
objects or of the trainer must leave every resolved config, and so every cache key, unchanged: a
changed key silently invalidates a shared cache (hours of warm-ups). When a key must change on
purpose, regenerate the fixture and say why in the commit::

    python -m tests.test_key_stability --write

Keys are computed as the pipeline computes them (``validate_config`` -> resolved dict ->
``grads.pipeline.job_identities``), on the CPU (``dtype=auto`` and ``procs=auto`` resolve per
machine, so CUDA is hidden). The evaluate key hashes the eval data under ``../shared/data``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).with_name("stage_keys.json")

PAPER = ["experiment=paper_main"]
# name -> overrides; each names what it covers.
CASES: dict[str, list[str]] = {
    "smoke": ["experiment=smoke"],
    "demo": ["experiment=demo"],
    "main_fin_grads_p5": [*PAPER, "domain=financial", "selector=grads", "budget=p5"],
    "main_fin_less_p50": [*PAPER, "domain=financial", "selector=less", "budget=p50"],
    "main_fin_random_p5": [*PAPER, "domain=financial", "selector=random", "budget=p5"],
    "main_med_full_p5": [*PAPER, "domain=medical", "selector=full", "budget=p5"],
    "main_med_rds_p50": [*PAPER, "domain=medical", "selector=rds", "budget=p50"],
    "main_med_grads_paper_p5": [*PAPER, "domain=medical", "selector=grads_paper", "budget=p5"],
    "main_med_ifd_p5_seed1": [*PAPER, "domain=medical", "selector=ifd", "budget=p5", "seed=1"],
    # legal's IFD uses features.ifd_answer=matched (conf/domain/legal.yaml), pinned before it ran
    "main_leg_ifd_p5": [*PAPER, "domain=legal", "selector=ifd", "budget=p5"],
    "ablation_med_density_embed": [
        "experiment=paper_ablation",
        "domain=medical",
        "selector.rule=density",
        "selector.layers=[embed]",
    ],
    "ablation_fin_dxm_both": [
        "experiment=paper_ablation",
        "domain=financial",
        "selector.rule=density_x_magnitude",
        "selector.layers=[embed,lm_head]",
    ],
    # pinned with the former trainer=cpu_full; the tuning group reaches the identical config
    "lora_vs_full_cpu_full": [
        "experiment=paper_lora_vs_full",
        "domain=medical",
        "tuning=full",
        "trainer.name=cpu_full",
        "selector=random",
    ],
    "lora_vs_full_cpu": ["experiment=paper_lora_vs_full", "domain=medical", "selector=grads"],
    "default": [],
    "zero2": ["trainer=zero2"],
    "zero3": ["trainer=zero3"],
    "zero3_full": ["trainer=zero3", "tuning=full", "trainer.lr=1e-5"],
    "zero3_offload": ["trainer=zero3_offload"],
    "mode_full": ["trainer.mode=full"],
    "cpu_full": ["tuning=full", "trainer.name=cpu_full"],
    "smoke_eval_none": ["experiment=smoke", "eval=none"],
    "smoke_eval_standard": ["experiment=smoke", "eval=standard"],
}


# Other spellings of a pinned case: the same resolved config, so the same keys.
ALIASES: dict[str, tuple[str, list[str]]] = {
    "zero3_mode_full": ("zero3_full", ["trainer=zero3", "trainer.mode=full", "trainer.lr=1e-5"]),
    "main_tuning_lora": (
        "main_fin_grads_p5",
        [*PAPER, "domain=financial", "selector=grads", "budget=p5", "tuning=lora"],
    ),
}


def compute_keys(cache_dir: str) -> dict[str, dict[str, str]]:
    """``{case: {stage: key, "config": digest}}`` for every case, with generated data (and the fingerprint index)
    under ``cache_dir``, computed by the pipeline's own ``job_identities``."""
    import torch
    from omegaconf import OmegaConf

    from grads.config import validate_config
    from grads.constants import REPO_ROOT, STAGES
    from grads.hashing import canonical, digest
    from grads.pipeline import job_identities
    from tests.conftest import compose

    saved = torch.cuda.is_available, torch.cuda.device_count
    torch.cuda.is_available, torch.cuda.device_count = (lambda: False), (lambda: 0)
    try:
        out: dict[str, dict[str, str]] = {}
        cases = {**CASES, **{a: ov for a, (_, ov) in ALIASES.items()}}
        for name, overrides in cases.items():
            cfg = validate_config(compose([*overrides, f"paths.cache_dir={cache_dir}"]))
            resolved = OmegaConf.to_container(cfg, resolve=True)
            out[name] = {s: i.key for s, i in job_identities(resolved, STAGES).items()}
            # the whole resolved config too (minus paths): non-semantic knobs must not move either
            text = canonical({k: v for k, v in resolved.items() if k != "paths"})
            # absolute paths (the data files under ../shared/data, the W&B dir in outputs/) differ
            # per clone and per machine, not per config: replace the longest roots first
            roots = {**{k: str(v) for k, v in resolved["paths"].items()}, "repo": str(REPO_ROOT)}
            roots["cache_dir"] = cache_dir
            for root_name, root in sorted(roots.items(), key=lambda kv: -len(kv[1])):
                text = text.replace(root, f"<{root_name}>")
            out[name]["config"] = digest(text)
        return out
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved


@pytest.fixture(scope="module")
def keys(tmp_path_factory, data_dir) -> dict[str, dict[str, str]]:
    return compute_keys(str(tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("case", sorted(CASES))
def test_stage_keys_are_unchanged(keys, case):
    expected = json.loads(FIXTURE.read_text())
    assert keys[case] == expected[case], (
        f"stage keys of {case} ({CASES[case]}) changed: a refactor changed the resolved config "
        "or an identity part; if intended, regenerate with python -m tests.test_key_stability "
        "--write and document the change"
    )


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_other_spellings_give_the_pinned_keys(keys, alias):
    assert keys[alias] == keys[ALIASES[alias][0]]


def test_lora_vs_full_differ_only_in_tuning(keys):
    """``tuning`` is its own axis: full tuning changes the warm-up's and fine-tune's keys."""
    full, lora = keys["lora_vs_full_cpu_full"], keys["lora_vs_full_cpu"]
    assert full["warmup"] != lora["warmup"] and full["finetune"] != lora["finetune"]


def test_fixture_covers_every_case():
    assert sorted(json.loads(FIXTURE.read_text())) == sorted(CASES)


if __name__ == "__main__":
    import tempfile

    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.test_key_stability --write")
    with tempfile.TemporaryDirectory() as tmp:
        pinned = {k: v for k, v in compute_keys(tmp).items() if k in CASES}
        FIXTURE.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
