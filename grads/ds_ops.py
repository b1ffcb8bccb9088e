"""DeepSpeed's JIT-built CPU communication op, built under a lock that cannot go stale.

On CPU (``DS_ACCELERATOR=cpu``) ``deepspeed.init_distributed`` compiles its shared-memory comm op
(``deepspeed_shm_comm``) with torch's ``cpp_extension``: about 80 s, once per machine and
``TORCH_EXTENSIONS_DIR``. Torch guards that build with a bare ``<build dir>/lock`` file. A process
killed while compiling leaves it behind, and every later process then waits on it forever without a
word.

:func:`ensure_comm_op` runs before DeepSpeed initialises (``grads.training.run_train``):

1. Built already and no ``lock``: return at once (the usual case).
2. Otherwise take a kernel lock beside the build folder (``flock``: released when its holder dies),
   saying after a few seconds what it waits for.
3. Holding it, a torch ``lock`` is stale unless a live process works in the build folder (ninja and
   the compiler run there): a stale one is removed with a warning, together with the half-built
   folder; a build by a process outside grads is waited for, with messages.
4. Build (or load) the op, so DeepSpeed's own call finds it ready.

``python -m grads.ds_ops`` builds it ahead of time (``make setup`` does).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

OP = "ShareMemCommBuilder"
# Without /proc the builders cannot be seen: a lock this old is then taken as stale.
STALE_WITHOUT_PROC_S = 600.0


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
    builder = _comm_builder()
    if builder is None:
        return
    build_dir = build_directory(builder.name)
    if is_built(build_dir, builder.name) and not (build_dir / "lock").exists():
        return
    from grads.cache import KeyLock

    guard = build_dir.with_name(f".{build_dir.name}.grads.lock")
    what = f"DeepSpeed {builder.name} op build"
    with KeyLock(guard, what, wait_message_s=wait_message_s, repeat_message_s=30.0):
        clear_stale_build_lock(build_dir, wait_message_s)
        if not is_built(build_directory(builder.name), builder.name):
            log.warning(
                "building DeepSpeed's %s op in %s (once; about 80 s on a CPU)",
                builder.name,
                build_dir,
            )
        t0 = time.monotonic()
        builder.load(verbose=False)
        log.info("%s ready after %.1f s", builder.name, time.monotonic() - t0)


def main() -> None:
    """Build the op now (``make setup``), so the first training run does not pay for it."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    ensure_comm_op()
    builder = _comm_builder()
    if builder is None:
        print("DeepSpeed's CPU comm op is not needed here")
    else:
        print(f"{builder.name} is built in {build_directory(builder.name)}")


if __name__ == "__main__":
    main()
