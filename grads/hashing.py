"""Hashing helpers of the cache keys: canonical JSON and its digest, content fingerprints of
files, and the knobs no key hashes.

Content fingerprints (:class:`Fingerprints`) are SHA-256 digests of file bytes, remembered in a
small index keyed by path and ``(size, mtime_ns, ctime_ns, inode)``: an unchanged file costs one
``stat``; a changed one is hashed again. A file modified within a second of being hashed is never
trusted from the index (git's "racily clean" rule), so a same-size rewrite cannot slip through.

The keys themselves are declared above this module: the trainer's in
:mod:`grads.training.identity`, the evaluation's in :mod:`grads.evaluation.identity`, the stages'
in :mod:`grads.identity` and :mod:`grads.stages`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# Knobs read by nobody or that change how a stage runs, not what it produces (tests check that each
# top-level config key and each knob of these sections is classified).
NON_SEMANTIC: dict[str, frozenset[str]] = {
    "trainer": frozenset(
        {
            "name",  # a label; the DeepSpeed template's content is keyed instead
            "procs",  # keyed through the global batch (and the layout when dropout is on)
            "micro_batch_size",
            "grad_accum",
            "save_every",
            "keep_checkpoints",
            "clean_checkpoints",
            "log_every",
            "stop_after_steps",
            "gradient_checkpointing",  # recomputes activations: same maths
        }
    ),
    # same table for any batch / process / thread / chunk split, with or without a progress bar
    "features": frozenset({"batch_size", "procs", "num_threads", "progress", "chunk_size"}),
    "eval": frozenset({"batch_size"}),
    "data": frozenset({"num_proc"}),  # never read
    # hub_datasets: never read; path: the custom domain's pool, keyed by content through its source;
    # target: read only by targeted selectors, keyed in the features stage as `features.target`.
    "domain": frozenset({"hub_datasets", "path", "target"}),
    # Top-level keys that are bookkeeping or act after the cached stages (export, objective);
    # dist: where processes run (the trainer's world size is keyed through its global batch).
    "": frozenset(
        {"stages", "group", "tags", "paths", "logger", "local", "export", "objective", "dist"}
    ),
}


# --------------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------------
def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, tuples as lists) of an identity."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def digest(obj: Any, n: int = 16) -> str:
    """Short SHA-256 hex digest of an identity's canonical JSON."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def without(d: Mapping | None, keys: Iterable[str]) -> dict:
    drop = set(keys)
    return {k: v for k, v in (d or {}).items() if k not in drop and not str(k).startswith("_")}


# --------------------------------------------------------------------------------------------------
# Content fingerprints
# --------------------------------------------------------------------------------------------------
class Fingerprints:
    """SHA-256 of files and folders, with a stat fast path remembered in ``index_path`` (JSON).

    Args:
        index_path: where the ``path -> (stat, sha256)`` index is kept (e.g. inside the cache);
            ``None`` keeps it in memory only.
        racy_s: a file whose mtime is within this many seconds of its hashing time is re-hashed.
    """

    def __init__(self, index_path: str | os.PathLike | None = None, racy_s: float = 1.0):
        self.index_path = Path(index_path) if index_path else None
        self.racy_ns = int(racy_s * 1e9)
        self.index: dict[str, dict] = {}
        self.hashed: list[str] = []  # files whose content was read (tests and logs)
        self._dirty = False
        if self.index_path is not None and self.index_path.exists():
            try:
                self.index = json.loads(self.index_path.read_text())
            except (OSError, ValueError):
                log.warning("unreadable fingerprint index %s: starting afresh", self.index_path)

    @staticmethod
    def _stat(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def file(self, path: str | os.PathLike) -> str:
        """SHA-256 of a file's bytes (from the index when its stat is unchanged and not racy)."""
        p = Path(path).resolve()
        st = p.stat()
        entry = self.index.get(str(p))
        if (
            entry is not None
            and entry["stat"] == self._stat(st)
            and entry["hashed_ns"] - st.st_mtime_ns > self.racy_ns
        ):
            return entry["sha256"]
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        self.index[str(p)] = {
            "stat": self._stat(st),
            "sha256": h.hexdigest(),
            "hashed_ns": time.time_ns(),
        }
        self.hashed.append(str(p))
        self._dirty = True
        return h.hexdigest()

    def tree(self, path: str | os.PathLike) -> str:
        """Digest of a folder: every file's relative path and content (hidden files skipped)."""
        root = Path(path)
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        return digest([[str(p.relative_to(root)), self.file(p)] for p in files], n=64)

    def path(self, path: str | os.PathLike) -> str:
        """:meth:`file` or :meth:`tree`; raises ``FileNotFoundError`` naming the path."""
        p = Path(path)
        if p.is_dir():
            return self.tree(p)
        if not p.exists():
            raise FileNotFoundError(f"input file not found: {p}")
        return self.file(p)

    def save(self) -> None:
        """Merge this index into ``index_path`` (atomic replace; a lost update only costs a hash)."""
        if self.index_path is None or not self._dirty:
            return
        from grads.io import write_json

        merged = {}
        try:
            merged = json.loads(self.index_path.read_text()) if self.index_path.exists() else {}
        except (OSError, ValueError):
            merged = {}
        merged.update(self.index)
        write_json(self.index_path, merged, indent=None)
        self._dirty = False


_SHARED: dict[str, Fingerprints] = {}


def fingerprints_for(cache_dir: str | os.PathLike | None) -> Fingerprints:
    """The process-wide :class:`Fingerprints` whose index lives in ``cache_dir``."""
    key = str(Path(cache_dir).resolve()) if cache_dir else ""
    if key not in _SHARED:
        _SHARED[key] = Fingerprints(Path(key) / "fingerprints.json" if key else None)
    return _SHARED[key]


def fingerprints_of(cfg: Mapping) -> Fingerprints:
    return fingerprints_for((cfg.get("paths") or {}).get("cache_dir"))


def referenced_files(fn: Callable | None, kwargs: Mapping, roots: Iterable[Path]) -> list[Path]:
    """Files and folders a loader may read: its string arguments (given, else defaulted) that name
    an existing path under one of ``roots``. A reader that takes ``test_file=...`` next to its main
    file, or a loader with a default folder, is covered without naming each loader here."""
    values = dict(kwargs)
    if fn is not None:
        try:
            for name, p in inspect.signature(fn).parameters.items():
                if name not in values and isinstance(p.default, str):
                    values[name] = p.default
        except (TypeError, ValueError):  # builtins / C functions: only the given kwargs count
            pass
    out: list[Path] = []
    for value in values.values():
        if not isinstance(value, str) or not value or "\n" in value or len(value) > 400:
            continue
        for root in roots:
            p = Path(value) if Path(value).is_absolute() else Path(root) / value
            if p.exists() and p not in out:
                out.append(p)
                break
    return out


def relative_path(path: Path, roots: Iterable[Path]) -> str:
    """``path`` relative to the first root holding it (keys never hold an absolute path)."""
    for root in roots:
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            continue
    return Path(path).name
