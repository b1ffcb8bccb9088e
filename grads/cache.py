"""The stage cache: ``<root>/<stage>/<key>/`` folders that are either complete or absent.

Safe under concurrent jobs (joblib, SLURM arrays) sharing one cache folder:

* **One writer per key.** ``get_or_run`` takes an exclusive lock per ``(stage, key)``
  (``filelock``: ``flock``, which the kernel releases when its holder dies; local disks, NFSv4 and
  Lustre mounted with ``flock`` have it, and filelock >= 4 falls back to a lock file it breaks when
  the owner's pid is gone elsewhere). A second job for the same key waits, saying every so often
  who it waits for, and then reuses the first job's result.
* **A private work folder per attempt**, ``<key>.<host>-<pid>-<nonce>.partial``. An attempt left by
  a killed or interrupted job is adopted (renamed) by the next holder of the lock, so training stages
  resume from their checkpoints; nobody else ever writes into it. An attempt that *fails* (the
  stage raises an ``Exception``: bad data, a bad budget, a bug) is removed at once, unless it holds
  a training checkpoint (:data:`RESUMABLE`): what a stopped stage (``StageInterrupted``), Ctrl-C
  or a kill leaves is what the same command resumes from, nothing else is left behind.
* **Done is written last.** On completion the attempt gets ``stage.json``, ``identity.json`` (what
  the key hashes, with a readable summary) and ``manifest.json`` (size and SHA-256 of every file);
  every file and folder is fsynced, then ``DONE`` is written and synced, and the folder is renamed
  to ``<key>`` in one ``os.replace``.
* **Time counts every attempt.** ``stage.json``'s ``wall_s`` is the entry's whole cost: each
  earlier attempt from its start to the last file it wrote (recorded beside the lock,
  ``.locks/<key>.attempts.json``), plus the attempt that finished it (``attempt_wall_s``,
  ``attempts`` when there were several).
* **Stale owners are named.** The lock holder writes ``.locks/<key>.owner.json`` (pid, host, start)
  and removes it when it exits, even on an exception. A record found by the next holder means the
  previous one died: a warning names it before its attempt is resumed.
* **A hit is checked**: every manifest file must exist with its size; an entry that fails is moved
  aside and recomputed (``grads-cache verify`` re-hashes the content).

``hits`` / ``misses`` count per instance; ``<root>/events.jsonl`` records every hit, miss, wait,
failure (and whether its folder was kept) and stale owner across jobs. ``grads-cache ls|verify|gc``
(:func:`main`) lists, checks and cleans it; a missing cache folder is an error, not an empty cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grads.io import read_json, write_json, write_text
from grads.locks import KeyLock, try_lock

log = logging.getLogger(__name__)

DONE, MANIFEST, IDENTITY, STAGE_INFO = "DONE", "manifest.json", "identity.json", "stage.json"
EVENTS = "events.jsonl"
LOCKS = ".locks"
PARTIAL = ".partial"
BASE_EVAL = "eval_base"
# A failed attempt holding one of these (relative to its work folder) is kept for the next attempt
# to resume: the pointer to the last complete training checkpoint (grads.training.checkpoints,
# written under grads.training.settings.CKPT_DIR) and the finished chunks of a features pass
# (grads.features.compute.CHUNK_DIR) and of its representation passes
# (grads.features.store.REP_CHUNK_DIR).
RESUMABLE = ("checkpoints/latest", "features.chunks", "representations.chunks")


def resumable_failure(exc: BaseException) -> bool:
    """Whether ``exc`` interrupted a stage rather than failed it: the stages' ``StageInterrupted``
    (stopped early, e.g. ``stop_after_steps``) or a ``BaseException`` that is not an ``Exception``
    (``KeyboardInterrupt`` from Ctrl-C, ``SystemExit``)."""
    from grads.stages.base import StageInterrupted

    return not isinstance(exc, Exception) or isinstance(exc, StageInterrupted)


# --------------------------------------------------------------------------------------------------
# Files: sync, manifest
# --------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first), so a crash keeps what ``DONE`` claims."""
    dirs = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync(p)
        dirs += [Path(dirpath) / d for d in dirnames]
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync(d)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, DONE)
    )


def write_manifest(root: Path) -> dict:
    """Write ``manifest.json``: size and SHA-256 of every file under ``root``."""
    files = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _entry_files(root)
    }
    manifest = {"files": files, "bytes": sum(f["size"] for f in files.values())}
    write_json(root / MANIFEST, manifest)
    return manifest


def check_entry(root: Path, content: bool = False) -> list[str]:
    """Problems of a completed entry against its manifest (sizes; hashes too with ``content``)."""
    if not (root / DONE).exists():
        return ["no DONE marker"]
    if not (root / MANIFEST).exists():
        return ["no manifest.json (written by an older version: remove with `grads-cache gc`)"]
    try:
        files = read_json(root / MANIFEST)["files"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"unreadable manifest.json ({exc})"]
    problems = []
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"missing {rel}")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"size changed: {rel} ({p.stat().st_size} != {meta['size']} bytes)")
        elif content and _sha256(p) != meta["sha256"]:
            problems.append(f"content changed: {rel}")
    if content:
        extra = sorted({p.relative_to(root).as_posix() for p in _entry_files(root)} - set(files))
        problems += [f"not in manifest: {rel}" for rel in extra]
    return problems


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------
class StageCache:
    """``<root>/<stage>/<key>`` folders, computed at most once at a time per key.

    Args:
        root: the cache folder (``cfg.paths.cache_dir``).
        wait_message_s: seconds of waiting for another job before saying so.
    """

    def __init__(self, root: str | os.PathLike, wait_message_s: float = 5.0):
        self.root = Path(root)
        self.wait_message_s = wait_message_s
        self.hits: list[str] = []
        self.misses: list[str] = []

    def final(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def done(self, stage: str, key: str) -> bool:
        return (self.final(stage, key) / DONE).exists()

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / stage / LOCKS / f"{key}.lock"

    def attempts(self, stage: str, key: str) -> list[Path]:
        """Attempt folders of ``key`` (any owner), newest first."""
        found = list((self.root / stage).glob(f"{key}.*{PARTIAL}"))
        legacy = self.root / stage / f"{key}{PARTIAL}"
        found += [legacy] if legacy.is_dir() else []
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def event(self, stage: str, key: str, event: str, **extra: Any) -> None:
        """Append one line to ``events.jsonl`` (one ``write``: lines of concurrent jobs stay whole)."""
        row = {"time": time.time(), "stage": stage, "key": key, "event": event}
        row |= {"pid": os.getpid(), "host": socket.gethostname(), **extra}
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row, default=str) + "\n").encode())
        finally:
            os.close(fd)

    def get_or_run(
        self,
        stage: str,
        key: str,
        fn: Callable[[Path], dict | None],
        identity: dict | None = None,
    ) -> Path:
        """Return the completed folder for ``(stage, key)``, running ``fn(work_dir)`` on a miss.

        ``identity`` (what the key hashes, plus a ``summary``) is saved as ``identity.json``.
        If ``fn`` raises, its work folder is kept for the next attempt to resume when the attempt
        was interrupted or holds a training checkpoint, and removed otherwise (see
        :meth:`_after_failure`).
        """
        final = self.final(stage, key)
        if self._usable(stage, key):
            return self._hit(stage, key, 0.0)
        what = f"[{stage}] {key}"
        with KeyLock(self.lock_path(stage, key), what, self.wait_message_s) as lock:
            if lock.stale is not None:
                self.event(stage, key, "stale_owner", owner=lock.stale)
            if self._usable(stage, key):  # computed by the job we waited for
                return self._hit(stage, key, lock.waited_s)
            self.misses.append(stage)
            work = self._claim(stage, key)
            log.info("[%s] running -> %s", stage, final)
            self.event(stage, key, "miss", waited_s=round(lock.waited_s, 2), work=work.name)
            t0 = time.time()
            try:
                info = fn(work) or {}
            except BaseException as exc:
                kept = self._after_failure(stage, work, exc)
                self.event(stage, key, "failed", error=type(exc).__name__, kept=kept)
                raise
            self._publish(stage, key, work, info, identity, time.time() - t0)
        return final

    def _after_failure(self, stage: str, work: Path, exc: BaseException) -> bool:
        """Keep the work folder of an interrupted or resumable attempt, remove a failed one.

        Kept (the same command resumes from it): an interruption (a stage's
        ``StageInterrupted``, Ctrl-C, ``SystemExit``: anything :func:`resumable_failure` accepts)
        and an attempt holding a resumable training checkpoint (:data:`RESUMABLE`). Any other
        exception is a failure whose half-written folder nothing would reuse: it is removed.
        Returns whether the folder was kept.
        """
        if resumable_failure(exc) or any((work / rel).exists() for rel in RESUMABLE):
            log.warning("[%s] keeping %s: the same command resumes from it", stage, work)
            return True
        shutil.rmtree(work, ignore_errors=True)
        self._times_path(stage, work.name.split(".", 1)[0]).unlink(missing_ok=True)
        return False

    def _usable(self, stage: str, key: str) -> bool:
        """Done and intact (every manifest file present with its size); else quarantined."""
        if not self.done(stage, key):
            return False
        problems = check_entry(self.final(stage, key))
        if not problems:
            return True
        with try_lock(self.lock_path(stage, key)) as free:
            if free and self.done(stage, key):
                bad = self.final(stage, key)
                aside = bad.with_name(f"{key}.corrupt-{uuid.uuid4().hex[:6]}")
                log.warning(
                    "[%s] cache entry %s is damaged (%s): moved to %s and recomputed",
                    stage,
                    bad,
                    "; ".join(problems[:3]),
                    aside.name,
                )
                os.replace(bad, aside)
        return False

    def _hit(self, stage: str, key: str, waited_s: float) -> Path:
        self.hits.append(stage)
        final = self.final(stage, key)
        log.info("[%s] cache hit %s", stage, final)
        self.event(stage, key, "hit", waited_s=round(waited_s, 2))
        return final

    def _claim(self, stage: str, key: str) -> Path:
        """A fresh attempt folder for this process, adopting the newest abandoned one (resume)."""
        mine = self.root / stage / f"{key}.{socket.gethostname()}-{os.getpid()}-"
        mine = mine.with_name(mine.name + f"{uuid.uuid4().hex[:6]}{PARTIAL}")
        mine.parent.mkdir(parents=True, exist_ok=True)
        old = self.attempts(stage, key)  # we hold the lock: every other attempt is abandoned
        times = []
        if old:
            log.warning("[%s] resuming the interrupted attempt %s", stage, old[0].name)
            times = self._earlier_times(stage, key, old[0])
            os.replace(old[0], mine)
            for extra in old[1:]:
                log.warning("[%s] removing an older abandoned attempt %s", stage, extra.name)
                shutil.rmtree(extra, ignore_errors=True)
        mine.mkdir(exist_ok=True)
        write_json(self._times_path(stage, key), [*times, {"start": time.time()}])
        return mine

    def _times_path(self, stage: str, key: str) -> Path:
        """When each attempt at ``(stage, key)`` started and last wrote (beside its lock)."""
        return self.lock_path(stage, key).with_name(f"{key}.attempts.json")

    def _earlier_times(self, stage: str, key: str, adopted: Path) -> list[dict]:
        """The attempts before this one: each one's start, the last ending when the adopted folder
        was last written to (a folder from before this record has an unknown start)."""
        path = self._times_path(stage, key)
        times = read_json(path) if path.is_file() else [{"start": None}]
        mtimes = [p.stat().st_mtime for p in adopted.rglob("*") if p.is_file()]
        times[-1]["last_write"] = max(mtimes, default=adopted.stat().st_mtime)
        return times

    def _attempt_costs(self, stage: str, key: str, wall: float) -> dict:
        """``wall_s`` of the whole entry (earlier attempts until their last write, plus this one)
        and, when it took several attempts, this one's own time and their count."""
        path = self._times_path(stage, key)
        times = read_json(path) if path.is_file() else []
        path.unlink(missing_ok=True)
        earlier = times[:-1]
        if not earlier:
            return {"wall_s": wall}
        known = [t for t in earlier if t.get("start") is not None]
        spent = sum(max(0.0, t["last_write"] - t["start"]) for t in known)
        out = {"wall_s": wall + spent, "attempt_wall_s": wall, "attempts": len(times)}
        if len(known) < len(earlier):  # begun before attempts were recorded: not counted
            out["attempts_uncounted"] = len(earlier) - len(known)
        return out

    def _publish(
        self, stage: str, key: str, work: Path, info: dict, identity: dict | None, wall: float
    ) -> None:
        final = self.final(stage, key)
        costs = self._attempt_costs(stage, key, wall)
        write_json(work / STAGE_INFO, {"stage": stage, "key": key, **costs, **info})
        ident = dict(identity or {})
        ident |= {
            "stage": stage,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "host": socket.gethostname(),
        }
        write_json(work / IDENTITY, ident)
        write_manifest(work)
        fsync_tree(work)
        write_text(work / DONE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))  # fsynced by write_text
        if final.exists():  # left by an older version without a usable DONE: keep it aside
            os.replace(final, final.with_name(f"{key}.corrupt-{uuid.uuid4().hex[:6]}"))
        os.replace(work, final)
        _fsync(final.parent)
        self.event(stage, key, "done", wall_s=round(wall, 2))


# --------------------------------------------------------------------------------------------------
# Listing, verification, garbage collection
# --------------------------------------------------------------------------------------------------


def scan(root: Path) -> list[dict]:
    """Every entry of the cache: ``{stage, key, path, status, summary, upstream}``.

    Status: ``done``, ``partial`` (an attempt folder), ``running`` (an attempt whose lock is held),
    ``corrupt`` (moved aside), ``legacy`` (no identity/manifest: an older cache version),
    ``incomplete`` (a ``<key>`` folder without ``DONE``).
    """
    from grads.constants import STAGES

    out: list[dict] = []
    for stage in (*STAGES, BASE_EVAL):  # other folders (generated data, ...) are not entries
        stage_dir = root / stage
        if not stage_dir.is_dir():
            continue
        if stage == BASE_EVAL:
            out += _scan_base_eval(stage_dir)
            continue
        for p in sorted(stage_dir.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            key = p.name.split(".")[0]
            row = {"stage": stage, "key": key, "path": p, "summary": {}, "upstream": {}}
            if p.name.endswith(PARTIAL):
                with try_lock(stage_dir / LOCKS / f"{key}.lock") as free:
                    row["status"] = "partial" if free else "running"
            elif ".corrupt-" in p.name:
                row["status"] = "corrupt"
            elif not (p / DONE).exists():
                row["status"] = "incomplete"
            elif not (p / IDENTITY).exists():
                row["status"] = "legacy"
            else:
                ident = read_json(p / IDENTITY)
                row |= {
                    "status": "done",
                    "summary": ident.get("summary") or {},
                    "upstream": ident.get("upstream") or {},
                    "created": ident.get("created"),
                }
            out.append(row)
    return out


def _scan_base_eval(folder: Path) -> list[dict]:
    rows = []
    for p in sorted(folder.glob("*.json")):
        try:
            ident = read_json(p).get("identity") or {}
        except (OSError, ValueError):
            ident = {}
        model = (ident.get("model") or {}).get("name")
        rows.append(
            {
                "stage": BASE_EVAL,
                "key": p.stem,
                "path": p,
                "status": "done" if ident else "corrupt",
                "summary": {"model.name": model, "tasks": ",".join(ident.get("tasks") or [])},
                "upstream": {},
            }
        )
    return rows


def event_counts(root: Path, by_key: bool = False) -> dict:
    """``stage -> {hit, miss, done, failed, stale_owner: count}`` from ``events.jsonl`` (keyed by
    ``(stage, key)`` with ``by_key``)."""
    counts: dict = {}
    path = root / EVENTS
    if not path.exists():
        return counts
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:  # a torn last line
                continue
            where = (row.get("stage"), row.get("key")) if by_key else row.get("stage", "?")
            per = counts.setdefault(where, {})
            per[row.get("event", "?")] = per.get(row.get("event", "?"), 0) + 1
    return counts
