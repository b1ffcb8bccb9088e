"""What the ``grads`` command does before its Hydra app: join the session a launcher
(torchrun, the DeepSpeed launcher, ``srun``) started, or, for a run over several nodes, become the
node's elastic agent (:func:`run_agent`). The process launch itself is :mod:`grads.launch`.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from grads.dist import TIMEOUT_ENV
from grads.launch import (
    INFO_FLAGS,
    DistSettings,
    failure_summary,
    launched_env,
    serve,
    slurm_nodes,
    start_session,
)


# --------------------------------------------------------------------------------------------------
# The `grads` command: before its Hydra app
# --------------------------------------------------------------------------------------------------
def before_hydra(argv: list[str], module: str) -> bool:
    """What the ``grads`` command does before its Hydra app; ``True``: nothing is left to do.

    * Started by a launcher (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set): join the session. Ranks
      other than 0 serve rank 0 and return ``True`` (no Hydra, no run folder); rank 0 appends its
      layout to ``argv`` as overrides (``dist.nnodes``, ``trainer.procs``, ``features.procs``) and
      returns ``False``, so the app composes the one config every rank works from.
    * Several nodes asked (``dist.*`` on the command line, or ``srun`` with one task per node): this
      process becomes the node's elastic agent (:func:`run_agent`) and returns ``True`` at the end.

    Args:
        argv: ``sys.argv`` (updated in place on rank 0).
        module: the command's module, which an agent's workers run (``python -m <module>``).
    """
    args = argv[1:]
    info = any(a.split("=")[0] in INFO_FLAGS for a in args)
    env = launched_env()
    if env is not None:
        if info:  # --cfg/--help under torchrun: rank 0 prints, the others have nothing to do
            return env[0] != 0
        start_session()
        if env[0] != 0:
            serve()
            return True
        argv += _layout_overrides(*env)
        return False
    asked = any(a.lstrip("+").startswith("dist.") for a in args) or slurm_nodes() is not None
    if info or not asked:
        return False
    settings, nproc = _agent_settings(args)
    if settings.nnodes <= 1:
        return False
    run_agent([sys.executable, "-m", module, *args], settings, nproc)
    return True


def _layout_overrides(rank: int, world: int, local: int) -> list[str]:
    """Rank 0's record of the launcher's layout, as Hydra overrides."""
    if world % local:
        raise SystemExit(
            f"grads: {world} processes do not split into nodes of {local}: start the same number "
            "of processes on every node (torchrun --nproc-per-node)"
        )
    return [f"dist.nnodes={world // local}", f"trainer.procs={local}", f"features.procs={local}"]


def _agent_settings(args: list[str]) -> tuple[DistSettings, int]:
    """``dist.*`` and the processes per node (``trainer.procs``) of the command line's config,
    composed without a run folder (sweeps of other keys are left out: they do not change them)."""
    from grads.config import compose_resolved

    cfg = compose_resolved(_plain_overrides(args), validate=False)
    try:
        settings = DistSettings.from_cfg(cfg)
    except ValueError as exc:
        raise SystemExit(f"grads: {exc}") from None
    procs = (cfg.get("trainer") or {}).get("procs", 1)
    if procs == "auto":
        import torch

        procs = max(1, torch.cuda.device_count())
    if settings.nnodes > 1 and not settings.rdzv_endpoint:
        raise SystemExit(
            f"grads: dist.nnodes={settings.nnodes} needs dist.rdzv_endpoint=host[:port], the "
            "address of one node, the same on every node (inside `srun` with one task per node "
            "it defaults to the first node of the job)"
        )
    return settings, int(procs)


def _plain_overrides(args: list[str]) -> list[str]:
    """The overrides of a command line without ``-m`` and without sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags = [a for a in args if a.startswith("-") and a not in ("-m", "--multirun")]
    if flags:
        raise SystemExit(f"grads: {flags} cannot be combined with several nodes")
    plain = [a for a in args if a not in ("-m", "--multirun")]
    keep = []
    for text, o in zip(plain, OverridesParser.create().parse_overrides(plain), strict=True):
        key = o.key_or_group
        if o.is_sweep_override() and (key.startswith("dist.") or key == "trainer.procs"):
            raise SystemExit(f"grads: {text}: the nodes and processes of a run cannot be swept")
        if not o.is_sweep_override():
            keep.append(text)
    return keep


def run_agent(cmd: list[str], s: DistSettings, nproc: int) -> None:
    """This node's elastic agent: ``nproc`` workers running ``cmd`` (the same ``grads`` command
    line), which meet the other nodes' at the c10d rendezvous ``s.rdzv_endpoint``.

    Raises:
        SystemExit: a worker, a node or the rendezvous failed (which rank, and how to resume).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[TIMEOUT_ENV] = str(s.timeout_s)  # the workers' collective timeout
    rdzv: dict[str, Any] = {"join_timeout": s.rdzv_timeout_s}
    if s.node_rank is not None:
        rdzv["is_host"] = s.node_rank == 0  # node 0 hosts the rendezvous store
    config = LaunchConfig(
        min_nodes=s.nnodes,
        max_nodes=s.nnodes,
        nproc_per_node=nproc,
        run_id=s.run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=s.rdzv_endpoint or "",
        rdzv_configs=rdzv,
        local_addr=s.local_addr,
        max_restarts=s.max_restarts,
        start_method="spawn",
    )
    where = f"node {s.node_rank if s.node_rank is not None else socket.gethostname()}"
    print(
        f"grads: {where} of {s.nnodes}: {nproc} worker(s), rendezvous {s.rdzv_endpoint} "
        f"(run id {s.run_id})",
        file=sys.stderr,
        flush=True,
    )
    try:
        elastic_launch(config, cmd[0])(*cmd[1:])
    except (ChildFailedError, RendezvousError, SignalException) as exc:
        raise SystemExit(
            f"grads: the run failed on {where}: {failure_summary(exc)}.\n"
            f"grads: when a node dies or is stopped, the others fail at their next collective "
            f"(within dist.timeout_s={s.timeout_s} s) or rendezvous. Re-run the same command on "
            "every node to resume: finished stages come from the stage cache, training from its "
            "last checkpoint."
        ) from None
