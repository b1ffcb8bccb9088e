"""Task files: the index of local task/group YAMLs (with the files that fail to parse) and their
fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class TaskFile:
    """One task or group YAML: its name, kind, file and (for groups) member names."""

    name: str
    kind: str  # "task" | "group"
    path: Path
    members: list[str] = field(default_factory=list)


def yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return Loader


def scan_task_files(dirs: list[Path]) -> tuple[dict[str, TaskFile], dict[Path, str]]:
    """Index every ``*.yaml`` under ``dirs`` by task/group name, and collect unparsable files.

    lm-eval silently skips a YAML it cannot parse (the task then looks "unknown"), so the files are
    parsed here first to be able to name the broken file in the error. Files with neither ``task``
    nor ``group`` are ``include`` templates and are not indexed.

    Returns:
        ``(index, broken)``: name -> :class:`TaskFile`, and path -> parse error.
    """
    import yaml

    loader = yaml_loader()
    index: dict[str, TaskFile] = {}
    broken: dict[Path, str] = {}
    for root in dirs:
        for path in sorted(Path(root).rglob("*.yaml")):
            if any(part in ("__pycache__", ".ipynb_checkpoints") for part in path.parts):
                continue
            try:
                cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506
            except yaml.YAMLError as exc:
                broken[path] = " ".join(str(exc).split())
                continue
            if not isinstance(cfg, dict):
                broken[path] = f"expected a mapping at the top level, got {type(cfg).__name__}"
                continue
            if "group" in cfg:
                members = [
                    m if isinstance(m, str) else (m.get("task") or m.get("group"))
                    for m in (cfg.get("task") or [])
                    if isinstance(m, str | dict)
                ]
                index[str(cfg["group"])] = TaskFile(
                    str(cfg["group"]), "group", path, [str(m) for m in members if m]
                )
            elif isinstance(cfg.get("task"), str):
                index[cfg["task"]] = TaskFile(cfg["task"], "task", path)
    return index, broken


def task_fingerprint(dirs: list[Path]) -> str:
    """A hash of every task file (YAML and Python) under ``dirs``: prompts changed -> new hash."""
    h = hashlib.sha1()
    for root in dirs:
        for path in sorted(list(Path(root).rglob("*.yaml")) + list(Path(root).rglob("*.py"))):
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
