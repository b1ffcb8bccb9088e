"""File locks with an owner record: one writer per cache key (:class:`KeyLock`), a
non-blocking probe (:func:`try_lock`). Used by the stage cache and the DeepSpeed op build.

``filelock`` (``flock``) is released by the kernel when its holder dies; the holder writes
``<lock>.owner.json`` (pid, host, start) and removes it when it exits, so a record found by the next
holder names the previous one, which died.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from grads.io import read_json, write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another process (no owner record yet)"
    age = time.time() - float(owner.get("started", time.time()))
    where = f"pid {owner.get('pid')} on {owner.get('host')}"
    if owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", -1))):
        where += " (no longer running)"
    return f"{where}, started {age:.0f} s ago"


class KeyLock:
    """Exclusive lock on one ``(stage, key)`` with an owner record; a context manager.

    Attributes (after entering):
        waited_s: seconds spent waiting for another holder.
        stale: the owner record of a previous holder that died without releasing, else None.
    """

    def __init__(
        self,
        lock_path: Path,
        what: str,
        wait_message_s: float = 5.0,
        repeat_message_s: float = 60.0,
        poll_s: float = 0.5,
    ):
        self.lock_path = Path(lock_path)
        self.owner_path = self.lock_path.with_suffix(".owner.json")
        self.what = what
        self.wait_message_s, self.repeat_message_s, self.poll_s = (
            wait_message_s,
            repeat_message_s,
            poll_s,
        )
        self.waited_s = 0.0
        self.stale: dict | None = None
        self._lock = None

    def owner(self) -> dict | None:
        try:
            return read_json(self.owner_path)
        except (OSError, ValueError):
            return None

    def __enter__(self) -> KeyLock:
        import filelock

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = filelock.FileLock(str(self.lock_path))
        t0, next_msg = time.monotonic(), self.wait_message_s
        while True:
            try:
                self._lock.acquire(timeout=self.poll_s)
                break
            except filelock.Timeout:
                self.waited_s = time.monotonic() - t0
                if self.waited_s >= next_msg:
                    log.warning(
                        "%s: waiting %.0f s for %s, which holds %s; its result will be reused",
                        self.what,
                        self.waited_s,
                        describe_owner(self.owner()),
                        self.lock_path,
                    )
                    next_msg += self.repeat_message_s
        self.waited_s = time.monotonic() - t0
        self.stale = self.owner()
        if self.stale is not None:
            log.warning(
                "%s: breaking the stale lock of %s: it exited without releasing %s",
                self.what,
                describe_owner(self.stale),
                self.lock_path,
            )
        write_json(
            self.owner_path,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "what": self.what,
                "argv": sys.argv[:8],
            },
        )
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.owner_path.unlink()
        self._lock.release()


@contextlib.contextmanager
def try_lock(lock_path: Path) -> Iterator[bool]:
    """Yield True while holding ``lock_path`` if it is free right now, else False (no waiting)."""
    import filelock

    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
