"""Shared stages first: a ``grads -m`` sweep computes the warm-up and features that its jobs share
before the grid fans out, so that no job of the grid waits on another's cache lock.

Without it, a cluster sweep starts every grid point at once, and every job that needs the same
warm-up queues on that warm-up's lock (:mod:`grads.cache`) holding its GPUs idle, until the one job
that computes it is done. :class:`SharedStagesFirst` is a Hydra callback
(``hydra.callbacks.shared_stages_first``; ``hydra/launcher=slurm`` and ``hydra/launcher=local`` set
it). At ``on_multirun_start`` it

1. expands the sweep as Hydra's basic sweeper will (``hydra.sweeper.params`` and the command
   line's sweeps; other sweepers, e.g. Optuna, are left alone),
2. composes every job's config and computes its warm-up and features keys
   (:func:`grads.pipeline.job_identities`, the keys the jobs will look up),
3. picks the keys that several jobs share and the stage cache does not hold yet, and
4. launches one *pre-step* job per distinct warm-up through the sweep's own launcher (under
   submitit a SLURM job with the same resources; under the basic launcher, in this process), which
   runs only those two stages (:func:`shared_stages_task`) into ``<sweep dir>/shared/<n>``, and
   waits for them. Further rounds compute the other features variants (e.g. with IFD) that several
   jobs share on a warm-up an earlier round made; jobs launched together never share a key.

Hydra then launches the grid as usual, and every job finds its warm-up and features in the cache.
A pre-step job is a Hydra job like the others: submitit requeues it on preemption or timeout
(``hydra.launcher.max_num_timeout``) and the re-run resumes from the cache and the trainer's
checkpoint. If one fails, the sweep stops before the grid is launched: every job would have
failed the same way.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SHARED = ("warmup", "features")
SUBDIR = "shared"  # pre-step jobs' folders under the sweep dir (no config_resolved.yaml: not rows)


class SharedStagesFirst(Callback):
    """Compute the warm-ups and features a sweep's jobs share before its grid is launched.

    Args:
        min_jobs: a key is computed first when at least this many jobs of the sweep need it.
    """

    def __init__(self, min_jobs: int = 2) -> None:
        self.min_jobs = int(min_jobs)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.precompute(config)
        except Exception:  # Hydra would only warn; the grid still runs, computing them itself
            log.exception("shared stages first: failed to plan the sweep; the grid runs as is")

    def precompute(self, config: DictConfig) -> None:
        """Plan and run the pre-step jobs of the sweep ``config`` describes."""
        jobs = sweep_jobs(config)
        if jobs is None:
            log.info("shared stages first: %s is not the basic sweeper: skipped", _sweeper(config))
            return
        groups = group_jobs(config, jobs)
        launched, tried = 0, set()
        for round_no in range(1, len(groups) + 1):  # a round per features variant of a warm-up
            batch = [g for g in plan_round(groups, self.min_jobs) if id(g) not in tried]
            if not batch:
                break
            tried |= {id(g) for g in batch}
            log.info(
                "shared stages first, round %d: %d pre-step job(s) before the %d grid job(s): %s",
                round_no,
                len(batch),
                len(jobs),
                "; ".join(_describe(g) for g in batch),
            )
            launch_shared(config, [jobs[g.jobs[0]] for g in batch], start=launched)
            launched += len(batch)
        if not launched:
            log.info("shared stages first: no shared warm-up or features missing from the cache")


def _sweeper(config: DictConfig) -> str:
    return str(OmegaConf.select(config, "hydra.sweeper._target_", default="?"))


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in the basic sweeper's order (``None``: another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not _sweeper(config).endswith("BasicSweeper"):
        return None
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    args = [f"{k}={v}" for k, v in params.items()]  # type: ignore[union-attr]
    args += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))  # type: ignore[arg-type]
    loader = (
        GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    )
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class Group:
    """Jobs sharing their warm-up (and features) keys, and where the cache keeps them."""

    def __init__(self, keys: tuple[str, ...], cache_dir: str) -> None:
        self.keys, self.cache_dir, self.jobs = keys, cache_dir, []

    def missing(self) -> bool:
        from grads.cache import StageCache

        return not StageCache(self.cache_dir).done(SHARED[len(self.keys) - 1], self.keys[-1])


def group_jobs(config: DictConfig, jobs: list[list[str]]) -> list[Group]:
    """The sweep's jobs grouped by their warm-up and features keys (a job whose config cannot be
    composed or checked is left out: it fails on its own, with its own message)."""
    from grads.config import validate_config
    from grads.pipeline import job_identities

    loader = _loader()
    groups: dict[tuple, Group] = {}
    for i, overrides in enumerate(jobs):
        try:
            cfg = loader.load_sweep_config(config, list(overrides))
            with _writable(cfg):
                del cfg["hydra"]
            resolved = OmegaConf.to_container(validate_config(cfg), resolve=True)
            stages = [s for s in SHARED if s in (resolved.get("stages") or SHARED)]
            ids = job_identities(resolved, stages) if stages else {}
        except Exception as exc:  # noqa: BLE001 - a broken job must not stop the others
            log.warning("shared stages first: job %d (%s) skipped: %s", i, overrides, exc)
            continue
        if not stages:
            continue
        keys = tuple(ids[s].key for s in stages)
        cache_dir = str(resolved["paths"]["cache_dir"])
        groups.setdefault((keys, cache_dir), Group(keys, cache_dir)).jobs.append(i)
    return list(groups.values())


def _describe(g: Group) -> str:
    names = [f"{stage} {key}" for stage, key in zip(SHARED, g.keys, strict=False)]
    return f"{', '.join(names)} ({len(g.jobs)} jobs)"


def plan_round(groups: list[Group], min_jobs: int) -> list[Group]:
    """At most one group per warm-up (jobs launched together never share a key): a group whose
    features several jobs need, or one for a warm-up several jobs need and the cache lacks."""
    per_warmup: dict[tuple, int] = defaultdict(int)
    for g in groups:
        per_warmup[(g.keys[0], g.cache_dir)] += len(g.jobs)
    picked: dict[tuple, Group] = {}
    for g in groups:
        where = (g.keys[0], g.cache_dir)
        if where in picked or not g.missing():
            continue
        warmup_missing = Group(g.keys[:1], g.cache_dir).missing()
        if len(g.jobs) >= min_jobs or (warmup_missing and per_warmup[where] >= min_jobs):
            picked[where] = g
    return list(picked.values())


def launch_shared(config: DictConfig, batch: list[list[str]], start: int = 0) -> None:
    """Run :func:`shared_stages_task` for each override list through the sweep's launcher, into
    ``<sweep dir>/shared/<n>``, and wait.

    Raises:
        SystemExit: a pre-step job failed (the grid is not launched).
    """
    from hydra._internal.callbacks import Callbacks
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobStatus
    from hydra.types import HydraContext

    context = HydraContext(config_loader=_loader(), callbacks=Callbacks())  # no callbacks inside
    launcher = Plugins.instance().instantiate_launcher(
        hydra_context=context, task_function=shared_stages_task, config=config
    )
    jobs = [[*ov, f"hydra.sweep.subdir={SUBDIR}/{start + i}"] for i, ov in enumerate(batch)]
    results = launcher.launch(jobs, initial_job_idx=start)
    failed = [(i, r) for i, r in enumerate(results) if r.status != JobStatus.COMPLETED]
    if failed:
        i, r = failed[0]
        raise SystemExit(
            f"grads: the shared warm-up/features job {SUBDIR}/{start + i} ({' '.join(batch[i])}) "
            f"failed: {r._return_value!r}. The grid was not launched; re-run the sweep to resume "
            "(finished stages come from the cache, training from its last checkpoint)."
        )


def shared_stages_task(cfg: DictConfig) -> dict:
    """A pre-step job: the warm-up and features stages of ``cfg``, through the stage cache (no
    selection, no ``metrics.json``). Returns the stages' keys and costs."""
    from hydra.utils import instantiate

    from grads.cache import StageCache
    from grads.config import validate_config
    from grads.pipeline import resolve_features_cfg, run_stages
    from grads.stages import Job
    from grads.stages.keys import stage_identities

    resolved = OmegaConf.to_container(validate_config(cfg), resolve=True)
    stages = [s for s in SHARED if s in (resolved.get("stages") or SHARED)]
    selector = instantiate(resolved["selector"])
    resolved = resolve_features_cfg(resolved, selector)
    ids = stage_identities(resolved, stages)
    job = Job(
        cfg=resolved,
        selector=selector,
        keys={s: i.key for s, i in ids.items()},
        cache=StageCache(resolved["paths"]["cache_dir"]),
        stages=tuple(stages),
    )
    costs = run_stages(job, ids)
    log.info("shared stages done: %s", {s: job.keys[s] for s in stages})
    return {"keys": {s: job.keys[s] for s in stages}, "cost": costs}


def _loader():
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader()


def _writable(cfg: DictConfig):
    import contextlib

    from omegaconf import open_dict, read_write

    stack = contextlib.ExitStack()
    stack.enter_context(read_write(cfg))
    stack.enter_context(open_dict(cfg))
    return stack
