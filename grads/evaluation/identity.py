"""What the evaluation contributes to cache keys: the content of the task files and eval data
behind a list of task names, and the identity of the base model's cached scores
(:func:`grads.evaluation.runner.base_cache_key`).

No absolute path enters an identity: the data root and generated files enter through their
content, so a key survives moving the cache or the data folder.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from grads.hashing import Fingerprints, fingerprints_of, referenced_files, relative_path, without
from grads.models import model_identity

MODEL_IGNORED_FOR_BASE_EVAL = frozenset({"lora_target_modules"})
_YAML: dict[tuple[str, int, int], Any] = {}
_SCANS: dict[tuple, Any] = {}


def _yaml(path: Path) -> Any:
    """A task YAML, parsed once per (path, mtime, size): keys are computed for every job."""
    import yaml

    from grads.evaluation.taskfiles import yaml_loader

    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _YAML:
        text = path.read_text(encoding="utf-8")
        _YAML[key] = yaml.load(text, Loader=yaml_loader())  # noqa: S506
    return _YAML[key]


def _includes(path: Path, raw: Any) -> list[Path]:
    """The files a task YAML's ``include`` names: a string or a list, each relative to the YAML's
    folder unless absolute (lm-eval's ``tasks._yaml_loader.load_yaml``)."""
    inc = raw.get("include") if isinstance(raw, dict) else None
    names = inc if isinstance(inc, list) else [inc]
    out = []
    for name in names:
        if isinstance(name, str) and name:
            p = Path(name).expanduser()
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def _include_chain(path: Path) -> list[Path]:
    """A task YAML followed by every file its ``include`` chain names (depth first, each once)."""
    chain: list[Path] = []
    seen: set[Path] = set()

    def visit(p: Path) -> None:
        if p.resolve() in seen or not p.exists():
            return
        seen.add(p.resolve())
        chain.append(p)
        for inc in _includes(p, _yaml(p)):
            visit(inc)

    visit(Path(path))
    return chain


def _task_yaml(path: Path, _seen: frozenset[Path] = frozenset()) -> dict:
    """A task YAML with its ``include`` chain merged as lm-eval merges it: the included files in
    order, each with its own includes, then the including file's keys (which win)."""
    raw = _yaml(path)
    raw = raw if isinstance(raw, dict) else {}
    seen = _seen | {Path(path).resolve()}
    merged: dict = {}
    for inc in _includes(path, raw):
        if inc.exists() and inc.resolve() not in seen:
            merged.update(_task_yaml(inc, seen))
    merged.update(raw)
    return merged


def _task_index(dirs: list[Path]) -> dict:
    """``harness.scan_task_files(dirs)``, reused while no YAML under ``dirs`` changes."""
    from grads.evaluation.taskfiles import scan_task_files

    sig = tuple(
        (str(p), p.stat().st_mtime_ns, p.stat().st_size)
        for d in dirs
        for p in sorted(Path(d).rglob("*.yaml"))
    )
    if sig not in _SCANS:
        _SCANS.clear()
        _SCANS[sig] = scan_task_files(dirs)[0]
    return _SCANS[sig]


def _task_closure(cfg: Mapping, names: list[str]) -> tuple[dict[str, Path], list[str], list[Path]]:
    """``(leaf -> YAML, built-in names, every local file involved)`` for the requested tasks."""
    from grads.evaluation.settings import include_dirs

    index = _task_index(include_dirs(cfg))
    leaves: dict[str, Path] = {}
    builtin: list[str] = []
    files: list[Path] = []

    def visit(name: str) -> None:
        entry = index.get(name)
        if entry is None:
            builtin.append(name)
            return
        files.append(entry.path)
        if entry.kind == "group":
            for m in entry.members:
                visit(m)
        else:
            leaves[name] = entry.path

    for n in names:
        visit(n)
    return leaves, sorted(set(builtin)), files


def task_files_identity(cfg: Mapping, names: list[str]) -> dict:
    """Content of the task YAMLs (with includes) behind ``names`` and of the task folders' Python
    loaders; the lm-eval version when a name is an lm-eval built-in."""
    from grads.evaluation.settings import include_dirs

    _, builtin, files = _task_closure(cfg, names)
    paths = {p for f in files for p in _include_chain(f)}
    dirs = include_dirs(cfg)
    for d in dirs:
        paths |= {p for p in Path(d).rglob("*.py") if "__pycache__" not in p.parts}
    ident: dict[str, Any] = {
        "files": {relative_path(p, dirs): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    }
    if builtin:
        import importlib.metadata as md

        try:
            ident["lm_eval"] = md.version("lm_eval")
        except md.PackageNotFoundError:
            ident["lm_eval"] = None
        ident["builtin"] = builtin
    return ident


def eval_data_identity(
    cfg: Mapping, names: list[str], fp: Fingerprints, metadata: Mapping | None = None
) -> dict:
    """Content of the data files the local tasks behind ``names`` read.

    Files are found declaratively, as lm-eval reads them:

    * ``custom_dataset`` loaders: their string arguments (the YAML's ``dataset_kwargs``, else the
      loader's defaults) that name a file or folder under the data root; for tasks outside the
      packaged folder also under the task YAML's folder or the working directory. A ``path_key``
      points at a generated file instead (synthetic tasks).
    * ``dataset_path`` tasks (``datasets.load_dataset``, e.g. ``dataset_path: json`` with
      ``dataset_kwargs: {data_files: ...}``): see :func:`_dataset_files`.

    Keys hold content and relative names, never an absolute path.
    """
    from grads.evaluation.settings import data_dir_of
    from grads.evaluation.tasks import TASKS_DIR

    leaves, _, _ = _task_closure(cfg, names)
    memo: dict[Path, str] = {}  # one folder serves many leaves (LegalBench, MMLU)

    def content(p: Path) -> str:
        if p not in memo:
            memo[p] = fp.path(p)
        return memo[p]

    root = data_dir_of(cfg, required=False)
    meta = dict(metadata or {})
    out: dict[str, Any] = {}
    for leaf, path in sorted(leaves.items()):
        task = _task_yaml(path)
        kwargs = dict(task.get("dataset_kwargs") or {})
        if "path_key" in kwargs:  # generated data: the runner passes its path as metadata
            if not meta:
                from grads.evaluation.settings import synthetic_metadata

                meta = synthetic_metadata(cfg)
            target = meta.get(kwargs["path_key"])
            out[leaf] = content(Path(target)) if target else None
            continue
        fn = _function(task.get("custom_dataset"))
        if fn is None and task.get("dataset_path"):
            out[leaf] = _dataset_files(task, content)
            continue
        roots = [root]
        if not _is_under(path, TASKS_DIR):  # a user's task: its own folder, the working directory
            roots += [Path(path).parent, Path.cwd()]
        files = referenced_files(fn, kwargs, roots)
        out[leaf] = {relative_path(p, roots): content(p) for p in files} or None
    return out


def _is_under(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


_GLOB = frozenset("*?[")


def _dataset_files(task: Mapping, content: Callable[[Path], str]) -> dict | None:
    """The local files ``datasets.load_dataset(dataset_path, **dataset_kwargs)`` reads, which is
    how lm-eval loads a task without ``custom_dataset``.

    Resolved as ``datasets`` resolves them: ``dataset_path`` a local folder (relative to the
    working directory) is read whole; otherwise (a packaged builder such as ``json``, or a hub id)
    ``data_files`` are relative to ``dataset_kwargs.data_dir`` or else the working directory, and a
    ``data_dir`` without ``data_files`` is read whole. ``data_files`` may be a string, a list or a
    dict of splits, with glob patterns; a URL or a name with no local file (a hub repository's) is
    kept as written (the YAML's text is keyed already). ``None`` when nothing is local.
    """
    import glob

    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as PACKAGED

    kwargs = dict(task.get("dataset_kwargs") or {})
    cwd = Path.cwd()
    name = str(task["dataset_path"])
    dataset = Path(name).expanduser()
    dataset = dataset if dataset.is_absolute() else cwd / dataset
    data_dir = kwargs.get("data_dir") if isinstance(kwargs.get("data_dir"), str) else None
    out: dict[str, Any] = {}
    if name not in PACKAGED and dataset.exists():  # a packaged builder's name wins (as in datasets)
        out["dataset_path"] = content(dataset)
        base = dataset / data_dir if data_dir else dataset
    else:
        base = (cwd / Path(data_dir).expanduser()) if data_dir else cwd
        if data_dir and base.is_dir() and kwargs.get("data_files") is None:
            out["data_dir"] = content(base)

    def files(spec: Any) -> Any:
        if isinstance(spec, Mapping):
            return {str(k): files(v) for k, v in spec.items()}
        if isinstance(spec, list | tuple):
            return [files(v) for v in spec]
        if not isinstance(spec, str) or "://" in spec:
            return spec
        p = Path(spec).expanduser()
        p = p if p.is_absolute() else base / p
        if _GLOB & set(spec):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            return {relative_path(f, [base]): content(f) for f in found} if found else spec
        return content(p) if p.exists() else spec

    if kwargs.get("data_files") is not None:
        out["data_files"] = files(kwargs["data_files"])
    return out or None


def _function(spec: Any) -> Callable | None:
    if not isinstance(spec, str) or "." not in spec:
        return None
    module, _, name = spec.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def base_eval_identity(cfg: Mapping, plan: Any, names: list[str], version: int) -> dict:
    """Identity of the base model's scores on ``names`` (``grads.evaluation.runner``'s cache).

    No absolute path: the data root and generated files enter through their content.
    """
    from grads.config_access import as_dict
    from grads.evaluation.settings import eval_settings

    cfg = as_dict(cfg)
    ev = eval_settings(cfg)
    fp = fingerprints_of(cfg)
    model = without(cfg.get("model"), MODEL_IGNORED_FOR_BASE_EVAL)
    ident = {
        "version": version,
        "model": model_identity(model, fp),
        "suite": ev["name"],
        "tasks": list(names),
        "limits": {leaf: plan.limits[leaf] for n in names for leaf in plan.leaves[n]},
        "num_fewshot": ev["num_fewshot"],
        "apply_chat_template": ev["apply_chat_template"],
        "fewshot_as_multiturn": ev["fewshot_as_multiturn"],
        "system_instruction": ev["system_instruction"],
        "metric": ev["metric"],
        "seed": ev["seed"],
        "task_files": task_files_identity(cfg, names),
        "eval_data": eval_data_identity(cfg, names, fp, plan.metadata),
    }
    fp.save()
    return ident
