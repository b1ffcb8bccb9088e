"""DeepSpeed's JIT-built CPU communication op: built once per environment, only where it is used.

On CPU (``DS_ACCELERATOR=cpu``) ``deepspeed.init_distributed`` compiles its shared-memory comm op
(``deepspeed_shm_comm``) with torch's ``cpp_extension``: about 80 s. Two things made that cost recur:

* **Where it is built.** torch builds into ``$TORCH_EXTENSIONS_DIR/<name>``, by default
  ``~/.cache/torch_extensions/py311_cpu/<name>``: one folder for every virtualenv of the machine.
  Its ``build.ninja`` holds the include paths of the environment that wrote it, so the next
  environment recompiles over it, and so on in turn. :func:`extensions_dir` gives each environment
  its own folder instead, ``<sys.prefix>/torch_extensions/py311_torch<version>`` (or, where
  ``sys.prefix`` is not writable, a folder under ``~/.cache/torch_extensions`` keyed by the
  interpreter and torch's version); a ``TORCH_EXTENSIONS_DIR`` you set is used as it is.
  :func:`use_environment_extensions_dir` exports it for this process and its workers, so every
  DeepSpeed op (also CPU Adam for ZeRO offload) builds there, once.
* **When it is needed.** The op serves collectives between processes. A single-process run has
  none: :func:`comm_op_for` neither builds nor loads it for a world of one (DeepSpeed would compile
  it inside ``init_distributed`` all the same), and makes sure it is ready for a larger one.

Torch guards a build with a bare ``<build dir>/lock`` file. A process killed while compiling leaves
it behind, and every later process then waits on it forever without a word. :func:`ensure_comm_op`:

1. Built already and no ``lock``: return at once (the usual case).
2. Otherwise take a kernel lock beside the build folder (``flock``: released when its holder dies),
   saying after a few seconds what it waits for (a build of the same op in the same folder, for the
   same environment: its result is then reused).
3. Holding it, a torch ``lock`` is stale unless a live process works in the build folder (ninja and
   the compiler run there): a stale one is removed with a warning, together with the half-built
   folder; a build by a process outside grads is waited for, with messages.
4. Build (or load) the op, so DeepSpeed's own call finds it ready.

``python -m grads.ds_ops`` builds it ahead of time (``make setup`` does), and says where.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

OP = "ShareMemCommBuilder"
# Without /proc the builders cannot be seen: a lock this old is then taken as stale.
STALE_WITHOUT_PROC_S = 600.0


def environment_tag() -> str:
    """``py311_torch2.13.0+cpu``: what a built op depends on besides the environment's paths."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "none"
    return f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch_version}"


def extensions_dir() -> Path:
    """Where torch builds JIT extensions for this environment.

    ``$TORCH_EXTENSIONS_DIR`` when set; else ``<sys.prefix>/torch_extensions/<tag>`` (inside the
    virtualenv or conda env: removed with it, never shared with another); else, for a read-only
    prefix (a system Python), ``~/.cache/torch_extensions/<tag>_<hash of interpreter and prefix>``.
    """
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    tag = environment_tag()
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions" / tag
    who = f"{os.path.realpath(sys.executable)}\0{prefix.resolve()}".encode()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "torch_extensions" / f"{tag}_{hashlib.sha256(who).hexdigest()[:12]}"


def use_environment_extensions_dir() -> Path:
    """Export :func:`extensions_dir` as ``TORCH_EXTENSIONS_DIR`` (unless set) for this process and
    the workers it starts; returns it."""
    path = extensions_dir()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(path))
    return path


def _comm_builder():
    """DeepSpeed's CPU comm op builder, or None where DeepSpeed would not build it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return None
    builder = acc.create_op_builder(OP)
    # The same test as deepspeed.comm.torch.build_shm_op.
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def build_directory(name: str) -> Path:
    """Where torch's ``cpp_extension`` builds ``name`` (honours ``TORCH_EXTENSIONS_DIR``)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def is_built(build_dir: Path, name: str) -> bool:
    return any(build_dir.glob(f"{name}*.so"))


def processes_in(folder: Path) -> list[int] | None:
    """Pids whose working directory is ``folder`` (ninja and the compiler), None without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "cwd").exists():
        return None
    target = str(folder.resolve())
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") == target:
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to inspect
            continue
    return pids


def clear_stale_build_lock(
    build_dir: Path,
    wait_message_s: float = 5.0,
    confirm_s: float = 3.0,
    min_age_s: float = 30.0,
    poll_s: float = 0.25,
) -> bool:
    """Wait while a live process builds in ``build_dir``; remove a ``lock`` nobody works under.

    The lock counts as stale once it is ``min_age_s`` old and no process has had its working
    directory in the build folder for ``confirm_s`` seconds (or, without /proc, once it is older
    than :data:`STALE_WITHOUT_PROC_S`). The age guard covers a live build's short Python phases
    around ninja (writing ``build.ninja``, importing the result), when nothing runs in the folder.
    The half-built folder goes with the lock, so the next build starts clean.

    Returns:
        True if a stale lock was removed.
    """
    lock = build_dir / "lock"
    t0, next_msg, quiet_since = time.monotonic(), wait_message_s, None
    while lock.exists():
        now = time.monotonic()
        pids = processes_in(build_dir)
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if pids is None:
            stale = age > STALE_WITHOUT_PROC_S
        else:
            quiet_since = (quiet_since or now) if not pids else None
            quiet = quiet_since is not None and now - quiet_since >= confirm_s
            stale = quiet and age >= min_age_s
        if stale:
            log.warning(
                "removing the stale build lock %s (%.0f s old; no process is building there: "
                "left by a killed run); rebuilding from scratch",
                lock,
                age,
            )
            shutil.rmtree(build_dir, ignore_errors=True)
            return True
        if now - t0 >= next_msg:
            log.warning(
                "waiting %.0f s for the build in %s (pids %s; about 80 s on a CPU the first time)",
                now - t0,
                build_dir,
                pids if pids is not None else "unknown",
            )
            next_msg += 30.0
        time.sleep(poll_s)
    return False


def ensure_comm_op(wait_message_s: float = 5.0) -> None:
    """Make sure DeepSpeed's CPU comm op is built and loadable, never waiting silently."""
    use_environment_extensions_dir()
    builder = _comm_builder()
    if builder is None:
        return
    build_dir = build_directory(builder.name)
    if is_built(build_dir, builder.name) and not (build_dir / "lock").exists():
        return
    from grads.locks import KeyLock

    guard = build_dir.with_name(f".{build_dir.name}.grads.lock")
    # The guard sits beside the build folder of this environment: whoever holds it builds the
    # same op with the same build.ninja, so a waiter reuses the result.
    what = f"DeepSpeed {builder.name} op build"
    with KeyLock(guard, what, wait_message_s=wait_message_s, repeat_message_s=30.0):
        clear_stale_build_lock(build_dir, wait_message_s)
        if not is_built(build_directory(builder.name), builder.name):
            log.warning(
                "building DeepSpeed's %s op in %s (once per environment; about 80 s on a CPU)",
                builder.name,
                build_dir,
            )
        t0 = time.monotonic()
        builder.load(verbose=False)
        log.info("%s ready after %.1f s", builder.name, time.monotonic() - t0)


@contextlib.contextmanager
def _deepspeed_without_comm_op() -> Iterator[None]:
    """``deepspeed.init_distributed`` without building or loading the comm op.

    DeepSpeed's torch backend builds the op in its constructor whatever the world size
    (``deepspeed.comm.torch.build_shm_op``) and uses it only for collectives between processes;
    with ``None`` it falls back to torch.distributed, which a world of one never calls. Where that
    function is missing (another DeepSpeed version) nothing is changed.
    """
    import importlib

    try:
        # import_module, not `import deepspeed.comm.torch as ...`: deepspeed.comm re-exports the
        # name `torch` (PyTorch itself) over its submodule attribute.
        backend = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        yield
        return
    saved = getattr(backend, "build_shm_op", None)
    if saved is None:
        yield
        return
    backend.build_shm_op = lambda: None
    try:
        yield
    finally:
        backend.build_shm_op = saved


@contextlib.contextmanager
def comm_op_for(world_size: int) -> Iterator[None]:
    """Around ``deepspeed.init_distributed``: the comm op for a world of several processes (built
    once per environment, see :func:`ensure_comm_op`), none for a single process."""
    use_environment_extensions_dir()  # also where DeepSpeed JIT-builds any other op (CPU Adam)
    if world_size > 1:
        ensure_comm_op()  # never hang silently on a build lock left by a killed run
        yield
        return
    log.debug("single process: DeepSpeed's comm op is neither built nor loaded")
    with _deepspeed_without_comm_op():
        yield


def main() -> None:
    """Build the op now (``make setup``), so the first training run does not pay for it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ensure_comm_op()
    builder = _comm_builder()
    if builder is None:
        print("DeepSpeed's CPU comm op is not needed here")
    else:
        print(
            f"{builder.name} is built in {build_directory(builder.name)} (this environment's "
            "TORCH_EXTENSIONS_DIR; runs of several processes load it from there)"
        )


if __name__ == "__main__":
    main()
