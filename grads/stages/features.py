"""The features stage: per-sample gradient norms (and the baselines' representation passes) of the
pool under the warm-up's model (:mod:`grads.features.compute`, :mod:`grads.features.representations`)."""

from __future__ import annotations

import logging
from pathlib import Path

from grads.identity import COMMON_SUMMARY, StageSpec, section_part
from grads.io import read_json, write_json
from grads.stages.base import Job, StageBase, load_trained

log = logging.getLogger(__name__)


def features_job(cfg: dict, warmup_dir: str, work: str) -> None:
    """One rank's share of the features pass (started by :func:`grads.launch.run_distributed`);
    every rank reads the warm-up's model and the pool, rank 0 writes."""
    from grads.data.pool import load_pool
    from grads.dist import compute_device, rank
    from grads.features.compute import run_features

    model, tokenizer = load_trained(cfg, Path(warmup_dir))
    # Models load on the CPU; without this move a GPU machine would compute features on the CPU.
    model.to(compute_device())
    pool, data_stats = load_pool(cfg, tokenizer, return_stats=True, reuse_from=warmup_dir)
    if rank() == 0:  # one writer: bad/filtered/dropped rows -> metrics.json
        write_json(Path(work) / "data.json", data_stats)
    if (Path(work) / "features.json").is_file():  # an attempt stopped during the passes below
        log.info("features: reusing the finished table of the interrupted attempt in %s", work)
    else:
        run_features(cfg, model, tokenizer, pool, work)
    if (cfg.get("features") or {}).get("representations"):
        from grads.features.representations import run_stage_passes

        del model
        run_stage_passes(cfg, warmup_dir, pool, work)


# What the stage's cache key hashes (see grads.identity).
SPEC = StageSpec("features", ("warmup",), {"features": section_part("features")}, COMMON_SUMMARY)


class Features(StageBase):
    """The features table, from a pass over the pool or from the warm-up's own steps."""

    name = "features"
    reads = "warmup"
    spec = SPEC

    def run(self, job: Job, work: Path) -> dict:
        from grads.launch import run_distributed

        cfg, warmup_dir = job.cfg, self.input_dir(job)
        if (cfg.get("features") or {}).get("source", "pass") == "warmup":
            from grads.features.compute import features_from_warmup

            # The warm-up recorded the table; the pass runs only for samples it did not train on.
            return features_from_warmup(cfg, warmup_dir, work)
        procs = int(cfg["features"].get("procs") or 1)
        run_distributed(
            "grads.stages.features:features_job", procs, cfg, str(warmup_dir), str(work)
        )
        info = read_json(work / "features.json")
        if (work / "representations.json").exists():
            info["representations"] = read_json(work / "representations.json")
        return info
