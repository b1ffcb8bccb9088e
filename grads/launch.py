"""Several processes and nodes through torch's elastic launcher (the API behind ``torchrun``).

A run gets its processes in one of three ways:

1. **One node** (``trainer.procs`` / ``features.procs`` > 1): the ``grads`` process composes the
   config once and starts each distributed stage's workers with ``elastic_launch`` (c10d rendezvous
   on a free loopback port); the workers receive the resolved config as arguments and never run
   Hydra (cf. Hydra issue 2070). :func:`run_distributed`.
2. **Several nodes, started by grads** (``dist.nnodes`` > 1, or ``srun`` with one task per node:
   :class:`DistSettings` reads the SLURM environment): the same ``grads`` command runs on every node
   and becomes that node's elastic agent. It composes the config only to read ``dist.*`` and
   ``trainer.procs`` (no run folder) and starts ``trainer.procs`` workers running the same command
   line; the nodes meet at the c10d rendezvous ``dist.rdzv_endpoint``. :func:`before_hydra`.
3. **A user's own launcher** (``torchrun`` running the ``grads`` app, the DeepSpeed launcher): ``RANK``,
   ``WORLD_SIZE`` and ``LOCAL_RANK`` are set, so nothing is spawned again.

In 2 and 3 the workers form one process group for the whole run, a *session*. Global rank 0 runs
the Hydra app: it alone composes the job's config, creates the run folder and writes outputs and
cache entries (the other ranks write only their own shards of a DeepSpeed checkpoint into the attempt
folder rank 0 claimed). Every other rank *serves*: it waits for rank 0 to broadcast a distributed
stage (a ``"module:function"`` spec and its resolved, Hydra-free arguments), runs its share, and waits
again, until rank 0 exits. Stages without a distributed part (select, evaluate) and cache hits run on
rank 0 alone. Under a session every distributed stage runs on all ranks: rank 0 records the layout in
its config (``dist.nnodes``, ``trainer.procs`` and ``features.procs`` = processes per node) so the
stage keys and ``config_resolved.yaml`` say what ran. Outputs and ``paths.cache_dir`` must be on a
filesystem every node sees.

Failures: the first rank to fail exits; its peers see the closed connection in their next collective
(or time out after ``GRADS_DIST_TIMEOUT_S`` = ``dist.timeout_s``) and fail with them; each agent then
says which rank failed and how to resume. Re-running the same command resumes: finished stages come
from the stage cache, training from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

from grads.dist import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

IDLE_ENV = "GRADS_DIST_IDLE_TIMEOUT_S"  # how long serving ranks wait for rank 0's next stage
DEFAULT_IDLE_S = 7 * 24 * 3600  # rank 0 may evaluate for hours while the others wait
DEFAULT_PORT = 29500
# Hydra flags that print or inspect and run nothing: no process group is formed for them.
INFO_FLAGS = ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion")
INFO_FLAGS += ("-sc", "--resolve", "--package", "-p")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_callable(fn: str | Callable | None) -> Callable | None:
    """``fn`` itself, or the function a ``"module:function"`` spec names (``None`` stays ``None``)."""
    if fn is None or callable(fn):
        return fn
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------------
# Where the processes come from: an elastic launcher's environment, SLURM, the dist.* config
# --------------------------------------------------------------------------------------------------
def launched_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world size, processes on this node)`` when a launcher started this process
    (torchrun, grads' own nodes, the DeepSpeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    set, more than one process), else ``None``. A world of one is no session: nothing to share, and
    single-process training itself sets these variables (``grads.training.distributed``), which a
    ``grads`` started from that process inherits."""
    env = os.environ if env is None else env
    if not all(env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    world = int(env["WORLD_SIZE"])
    if world <= 1:
        return None
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")  # torchrun / DeepSpeed's launcher
    return int(env["RANK"]), world, int(local or world)


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list (``gpu[01-03,07],login-a`` -> gpu01 gpu02 gpu03 gpu07
    login-a), as ``scontrol show hostnames`` prints them (zero padding kept)."""
    hosts: list[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` where it exists, else
    :func:`expand_nodelist`."""
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def slurm_nodes(env: Mapping[str, str] | None = None) -> tuple[int, int, str] | None:
    """``(nodes, this node's index, node list)`` inside an ``srun`` step with one task per node
    (how ``scripts/slurm/multinode.sbatch`` starts grads), else ``None``.

    The batch script itself, a login shell inside ``salloc`` and ``srun`` with one task per GPU are
    not "one grads per node": there every ``auto`` of ``dist`` means one node.
    """
    env = os.environ if env is None else env
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if not (env.get("SLURM_STEP_ID") and nodes and tasks and int(nodes) == int(tasks)):
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    return int(nodes), int(env.get("SLURM_NODEID", 0)), nodelist


def _check_dist_key(key: str, v: Any) -> str | None:
    """The problem of one ``dist.*`` value (``None``: fine)."""

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    ok = {
        "nnodes": v == "auto" or (is_int(v) and v >= 1),
        "node_rank": v in ("auto", None) or (is_int(v) and v >= 0),
        "rdzv_endpoint": v is None or (isinstance(v, str) and bool(v.strip())),
        "local_addr": v is None or (isinstance(v, str) and bool(v.strip())),
        "run_id": isinstance(v, str) and bool(v.strip()),
        "timeout_s": is_int(v) and v >= 1,
        "rdzv_timeout_s": is_int(v) and v >= 1,
        "max_restarts": is_int(v) and v >= 0,
    }[key]
    if ok:
        return None
    want = {
        "nnodes": "'auto' or an integer >= 1",
        "node_rank": "'auto', null or an integer >= 0",
        "rdzv_endpoint": "null or host[:port]",
        "local_addr": "null or a host name / address",
        "run_id": "'auto' or a name",
        "max_restarts": "an integer >= 0",
    }.get(key, "an integer >= 1 (seconds)")
    return f"dist.{key}={v!r}: expected {want}"


@dataclasses.dataclass
class DistSettings:
    """The ``dist`` node of the config with every ``auto`` resolved (defaults in conf/config.yaml).

    Attributes:
        nnodes: nodes of the run (``auto``: SLURM's node count inside ``srun`` with one task per
            node, else 1).
        node_rank: this node's index (``auto``: ``SLURM_NODEID``; ``None``: unknown, which is fine
            with c10d). Node 0 hosts the rendezvous store when it is known.
        rdzv_endpoint: ``host:port`` of the c10d rendezvous (``None`` on one node; the first SLURM
            node at :data:`DEFAULT_PORT` by default).
        local_addr: the address other nodes reach this one at (``None``: its host name).
        run_id: the rendezvous id the nodes share (``auto``: ``SLURM_JOB_ID``, else ``grads``).
        timeout_s: collective timeout: a dead node fails the others within this long.
        rdzv_timeout_s: how long a node waits for the others to join.
        max_restarts: elastic restarts of the workers after a failure (0: fail and re-run).
    """

    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    local_addr: str | None = None
    run_id: str = "grads"
    timeout_s: int = DEFAULT_TIMEOUT_S
    rdzv_timeout_s: int = 900
    max_restarts: int = 0

    @classmethod
    def from_cfg(cls, cfg: Mapping | None, env: Mapping[str, str] | None = None) -> DistSettings:
        """Settings from a resolved config (its ``dist`` node over the YAML defaults).

        Raises:
            ValueError: every problem, each naming its ``dist.*`` key.
        """
        problems, d = _dist_node(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        env = os.environ if env is None else env
        slurm = slurm_nodes(env)
        nnodes = slurm[0] if d["nnodes"] == "auto" and slurm else d["nnodes"]
        nnodes = 1 if nnodes == "auto" else int(nnodes)
        node_rank = d["node_rank"]
        if node_rank == "auto":
            node_rank = slurm[1] if slurm else None
        endpoint = d["rdzv_endpoint"]
        if endpoint is None and nnodes > 1 and slurm:
            endpoint = first_host(slurm[2])
        if node_rank is not None and node_rank >= nnodes:
            raise ValueError(f"dist.node_rank={node_rank}: expected < dist.nnodes={nnodes}")
        if endpoint is not None and ":" not in endpoint:
            endpoint = f"{endpoint}:{DEFAULT_PORT}"
        run_id = env.get("SLURM_JOB_ID", "grads") if d["run_id"] == "auto" else d["run_id"]
        keep = ("local_addr", "timeout_s", "rdzv_timeout_s", "max_restarts")
        return cls(nnodes, node_rank, endpoint, run_id=run_id, **{k: d[k] for k in keep})


def _dist_node(cfg: Mapping | None) -> tuple[list[str], dict]:
    """Problems of ``cfg["dist"]`` (unknown keys, bad values) and the node over its defaults."""
    from grads.config_access import defaults

    node = dict(defaults("dist"))
    given = dict((cfg or {}).get("dist") or {})
    unknown = sorted(set(given) - set(node))
    problems = [f"dist.{k}: unknown key; allowed: {sorted(node)}" for k in unknown]
    node.update({k: v for k, v in given.items() if k in node})
    problems += [p for k, v in node.items() if (p := _check_dist_key(k, v))]
    return problems, node


def dist_problems(cfg: Mapping) -> list[str]:
    """Config problems of the ``dist`` node, for :func:`grads.config.validate_config`: bad keys and
    values, and several nodes asked of a process that no launcher started as one of them."""
    problems, _ = _dist_node(cfg)
    if problems:
        return problems
    try:
        s = DistSettings.from_cfg(cfg)
    except ValueError as exc:
        return [str(exc)]
    env = launched_env()
    if s.nnodes > 1 and (env is None or env[1] == env[2]):
        problems.append(
            f"dist.nnodes={s.nnodes}: this process was not started as one of {s.nnodes} nodes; "
            "run the same `grads` command on every node (SLURM: scripts/slurm/multinode.sbatch) "
            "or start it with torchrun (see README, 'Several GPUs and nodes')"
        )
    return problems


def nnodes_of(cfg: Mapping) -> int:
    """``dist.nnodes`` of a resolved config, ``auto`` resolved (the launcher's layout under a
    session, SLURM's inside ``srun``, else 1); lenient: a bad value counts as 1 (the config check
    reports it)."""
    value = ((cfg.get("dist") if hasattr(cfg, "get") else None) or {}).get("nnodes", "auto")
    if value == "auto" or value is None:
        env = launched_env()
        if env is not None and env[2] and env[1] % env[2] == 0:
            return env[1] // env[2]
        slurm = slurm_nodes()
        return slurm[0] if slurm else 1
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


# --------------------------------------------------------------------------------------------------
# One node: a stage's workers through elastic_launch
# --------------------------------------------------------------------------------------------------
def _stage_worker(fn: str | Callable, args: tuple, kwargs: dict) -> Any:
    """One worker of a stage's launch: join the group, run ``fn``, wait for the other ranks."""
    import torch.distributed as tdist

    from grads.dist import init_process_group

    init_process_group()
    try:
        out = resolve_callable(fn)(*args, **kwargs)
        tdist.barrier()
        return out
    finally:
        tdist.destroy_process_group()


def failure_summary(exc: BaseException) -> str:
    """Which ranks failed and how, from an elastic ``ChildFailedError`` (else the error itself)."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return f"{type(exc).__name__}: {exc}"
    parts = []
    for rank, f in sorted(failures.items()):
        how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
        msg = f.message.get("message", "") if isinstance(f.message, dict) else str(f.message)
        msg = "" if msg.startswith("To enable traceback") else msg.strip().splitlines()[-1:]
        parts.append(f"rank {rank} ({how})" + (f": {msg[0]}" if msg else ""))
    return "; ".join(parts)


def _launch_local(fn: str | Callable, procs: int, args: tuple, kwargs: dict) -> Any:
    """``fn`` on ``procs`` workers of this node; rank 0's return value."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=procs,
        run_id=f"grads-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a store on a free loopback port, as `torchrun --standalone`
        local_addr="127.0.0.1",
        max_restarts=0,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, _stage_worker)(fn, args, kwargs)
    except ChildFailedError as exc:
        name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", str(fn))
        raise RuntimeError(f"{name} failed on {procs} processes: {failure_summary(exc)}") from exc
    return results.get(0)


def run_distributed(fn: str | Callable, procs: int, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on every rank; returns rank 0's value.

    Under a session (torchrun, several nodes) the session's ranks run it and ``procs`` is not
    used. Otherwise ``procs <= 1`` runs it in this process with no process group, and ``procs > 1``
    starts that many workers on this node through torch's elastic launcher. ``fn`` is a
    ``"module:function"`` spec or a module-level function; arguments must be picklable (resolved
    config dicts, not a ``DictConfig`` with interpolations).
    """
    if _SESSION:
        return _session_run(fn, args, kwargs)
    if procs <= 1:
        return resolve_callable(fn)(*args, **kwargs)
    return _launch_local(fn, procs, args, kwargs)


# --------------------------------------------------------------------------------------------------
# A session: one process group for the whole run; rank 0 drives, the other ranks serve
# --------------------------------------------------------------------------------------------------
_SESSION: dict[str, Any] = {}


def session_world() -> int | None:
    """The world size of this process's session (``None``: no session)."""
    return _SESSION.get("world")


def start_session() -> None:
    """Join the launcher's process group and a Gloo group with a long timeout in which the
    serving ranks wait for rank 0 (``GRADS_DIST_IDLE_TIMEOUT_S``, 7 days by default)."""
    import atexit
    import datetime

    import torch.distributed as tdist

    from grads.dist import init_process_group

    init_process_group()
    idle = float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_S)
    ctrl = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=idle))
    _SESSION.update(ctrl=ctrl, world=tdist.get_world_size(), rank=tdist.get_rank(), busy=False)
    if _SESSION["rank"] == 0:
        atexit.register(_release_servers)


def _session_run(fn: str | Callable, args: tuple, kwargs: dict) -> Any:
    """Rank 0: hand ``fn`` and its arguments to every rank, run its own share, wait for all."""
    import torch.distributed as tdist

    if _SESSION["rank"] != 0:  # a serving rank inside a stage: it is already running its share
        return resolve_callable(fn)(*args, **kwargs)
    tdist.broadcast_object_list([(fn, args, kwargs)], src=0, group=_SESSION["ctrl"])
    _SESSION["busy"] = True  # until the barrier: a failure here leaves peers inside a collective
    out = resolve_callable(fn)(*args, **kwargs)
    tdist.barrier()
    _SESSION["busy"] = False
    return out


def serve() -> None:
    """A serving rank: run each stage rank 0 hands out, until rank 0 releases the session."""
    import torch.distributed as tdist

    while True:
        box: list[Any] = [None]
        tdist.broadcast_object_list(box, src=0, group=_SESSION["ctrl"])
        if box[0] is None:
            break
        fn, args, kwargs = box[0]
        log.info("rank %d: running %s", _SESSION["rank"], fn)
        resolve_callable(fn)(*args, **kwargs)
        tdist.barrier()
    tdist.destroy_process_group()


def _release_servers() -> None:
    """At rank 0's exit: tell idle serving ranks to stop. After a failure inside a stage they are
    inside a collective instead, and fail on the closed connection when this process exits."""
    import torch.distributed as tdist

    if not _SESSION or _SESSION.get("busy") or not tdist.is_initialized():
        return
    try:
        tdist.broadcast_object_list([None], src=0, group=_SESSION["ctrl"])
        tdist.destroy_process_group()
    finally:
        _SESSION.clear()
