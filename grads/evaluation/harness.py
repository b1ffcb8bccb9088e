"""Task discovery, validation, per-task limits and in-process lm-eval runs.

The offline ``grads_*`` tasks live as YAML files in :mod:`grads.evaluation.tasks`; their data root is
never written in a YAML but passed at run time as ``TaskManager(metadata={"data_dir": ...})`` (the
loaders in ``tasks/utils.py`` read it). Any other name is looked up among lm-eval's built-in tasks,
so ``eval.tasks_from=hub`` (or a domain's ``eval_tasks_hub``) works for online users.

Limits. ``eval.limit`` is the default number of documents per *requested* task and
``eval.task_limits`` overrides it by name. A group's limit is split evenly (rounded up) over its
children, recursively, unless a child has its own override: ``grads_mmlu_general: 132`` evaluates 3
questions from each of its 44 subjects. A float in (0, 1) is a fraction of every leaf task instead.
Every ``grads_*`` evaluation split is shuffled with a fixed seed, so the first N documents are a
uniform sample. Limits are applied through ``simple_evaluate(samples={task: [0..N-1]})``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grads.config import as_dict
from grads.evaluation.tasks import TASKS_DIR

log = logging.getLogger(__name__)

# Generated tasks and the key of their file in grads.synthetic.materialise()'s result.
SYNTHETIC_TASKS = {"grads_synthetic": "eval_mc", "grads_probe": "probe"}
SYNTHETIC_METADATA = {"eval_mc": "synthetic_eval_mc", "probe": "synthetic_probe"}
# Tasks that read the run domain's held-out split (grads.heldout.materialise -> metadata key).
HELDOUT_TASKS = {"grads_heldout": "heldout_path"}

EVAL_DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "enabled": True,
    "tasks_from": "local",  # local: grads_* offline tasks | hub: lm-eval built-ins
    "general_tasks": [],
    "general_tasks_hub": [],
    "batch_size": 8,
    "max_length": None,
    "num_fewshot": None,  # None: each task's own default (0 unless its YAML says otherwise)
    "apply_chat_template": False,
    "fewshot_as_multiturn": None,  # None: follow apply_chat_template
    "system_instruction": None,
    "limit": None,
    "task_limits": {},
    "metric": "acc",
    "seed": 1234,
    "bootstrap_iters": 1000,
    "include_paths": [],
    # Continuous metrics (see grads.evaluation.metrics.LOSS_PARTS): log-likelihood task lists and
    # the task whose items also get KL(base || tuned), on its first ``kl_limit`` items.
    "domain_loss_tasks": [],
    "ref_tasks": [],
    "text_tasks": [],
    "kl_task": None,
    "kl_limit": None,
}


class TaskConfigError(ValueError):
    """A requested evaluation task that is unknown, malformed, or whose data cannot be loaded."""


# --------------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------------
def eval_settings(cfg: Any) -> dict:
    """``cfg["eval"]`` merged over :data:`EVAL_DEFAULTS`, with its values checked.

    Raises:
        TaskConfigError: on an unknown ``tasks_from`` / ``metric`` or a negative limit.
    """
    ev = dict(EVAL_DEFAULTS)
    ev.update(as_dict(cfg).get("eval") or {})
    for key, default in EVAL_DEFAULTS.items():  # a null knob means "default" where null is no value
        if ev[key] is None and default is not None:
            ev[key] = default
    if ev["tasks_from"] not in ("local", "hub"):
        raise TaskConfigError(f"eval.tasks_from={ev['tasks_from']!r}: expected 'local' or 'hub'")
    if ev["metric"] not in ("acc", "acc_norm"):
        raise TaskConfigError(f"eval.metric={ev['metric']!r}: expected 'acc' or 'acc_norm'")
    for name, lim in [("eval.limit", ev["limit"])] + [
        (f"eval.task_limits.{k}", v) for k, v in (ev["task_limits"] or {}).items()
    ]:
        if lim is not None and (
            isinstance(lim, bool) or not isinstance(lim, int | float) or lim < 0
        ):
            raise TaskConfigError(
                f"{name}={lim!r}: expected null, a count >= 0 or a fraction in (0, 1)"
            )
    kl_limit = ev["kl_limit"]
    if kl_limit is not None and (
        isinstance(kl_limit, bool) or not isinstance(kl_limit, int) or kl_limit < 1
    ):
        raise TaskConfigError(f"eval.kl_limit={kl_limit!r}: expected null or a count >= 1")
    ev["task_limits"] = dict(ev["task_limits"] or {})
    return ev


def task_lists(cfg: Any) -> tuple[list[str], list[str]]:
    """The domain and general task names of a run.

    Domain: ``domain.eval_tasks`` (``domain.eval_tasks_hub`` when ``eval.tasks_from=hub``). General:
    ``eval.general_tasks`` (``eval.general_tasks_hub``) plus the domain's own ``eval_tasks_general``
    (e.g. the synthetic domain's ``grads_probe``). Duplicates are dropped, order kept.
    """
    cfg = as_dict(cfg)
    ev, dom = eval_settings(cfg), cfg.get("domain") or {}
    hub = ev["tasks_from"] == "hub"
    domain = list(dom.get("eval_tasks_hub" if hub else "eval_tasks") or [])
    general = list(ev["general_tasks_hub" if hub else "general_tasks"] or [])
    general += list(dom.get("eval_tasks_general") or [])
    domain = list(dict.fromkeys(domain))
    general = [t for t in dict.fromkeys(general) if t not in domain]
    return domain, general


def part_lists(cfg: Any) -> dict[str, list[str]]:
    """Every task list of a run by part: ``domain``/``general`` (accuracy, :func:`task_lists`) and
    the log-likelihood parts ``domain_loss``/``ref``/``text`` (``eval.<part>_tasks``).

    A task listed in an accuracy part is not repeated in a loss part.
    """
    from grads.evaluation.metrics import LOSS_PARTS

    ev = eval_settings(cfg)
    domain, general = task_lists(cfg)
    parts = {"domain": domain, "general": general}
    seen = set(domain) | set(general)
    # A domain without a held-out split (e.g. a custom pool, whose every sample is for selection)
    # has no held-out loss to measure.
    skip = set(HELDOUT_TASKS) if not (as_dict(cfg).get("domain") or {}).get("heldout") else set()
    for part, key in LOSS_PARTS.items():
        names = [t for t in dict.fromkeys(ev[key] or []) if t not in seen | skip]
        seen |= set(names)
        parts[part] = names
    kl = ev["kl_task"]
    if kl and kl not in seen:
        raise TaskConfigError(
            f"eval.kl_task={kl!r} is not one of the run's tasks: list it in eval.ref_tasks"
        )
    return parts


def data_dir_of(cfg: Any, required: bool = True) -> Path:
    """``cfg.paths.data_dir`` (else ``$GRADS_DATA_DIR``, else ``.`` when not ``required``), absolute."""
    paths = as_dict(cfg).get("paths") or {}
    root = paths.get("data_dir") or os.environ.get("GRADS_DATA_DIR")
    if not root and required:
        raise TaskConfigError("no data root: set paths.data_dir (or GRADS_DATA_DIR)")
    return Path(str(root or ".")).expanduser().resolve()


def include_dirs(cfg: Any) -> list[Path]:
    """The packaged task folder plus ``eval.include_paths`` (each must exist)."""
    dirs = [TASKS_DIR]
    for p in eval_settings(cfg)["include_paths"] or []:
        path = Path(str(p)).expanduser().resolve()
        if not path.is_dir():
            raise TaskConfigError(f"eval.include_paths: {path} is not a folder")
        dirs.append(path)
    return dirs


def synthetic_metadata(cfg: Any) -> dict[str, str]:
    """Materialise the synthetic domain's files and return their paths as task metadata.

    Uses ``domain.generator`` when the domain has one, else the default generator parameters
    under ``<cache_dir>/synthetic/seed0``.
    """
    from grads import synthetic

    cfg = as_dict(cfg)
    gen = dict((cfg.get("domain") or {}).get("generator") or {})
    out_dir = gen.pop("out_dir", None)
    if out_dir is None:
        cache = (cfg.get("paths") or {}).get("cache_dir") or "outputs/cache"
        out_dir = Path(str(cache)) / "synthetic" / f"seed{int(gen.get('seed', 0))}"
    paths = synthetic.materialise(out_dir, **gen)
    return {meta: str(paths[key]) for key, meta in SYNTHETIC_METADATA.items()}


# --------------------------------------------------------------------------------------------------
# Task files
# --------------------------------------------------------------------------------------------------
@dataclass
class TaskFile:
    """One task or group YAML: its name, kind, file and (for groups) member names."""

    name: str
    kind: str  # "task" | "group"
    path: Path
    members: list[str] = field(default_factory=list)


def _yaml_loader():
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

    loader = _yaml_loader()
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


# --------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------
def _split(limit: int | float | None, k: int) -> int | float | None:
    if limit is None or (isinstance(limit, float) and 0 < limit < 1) or k <= 0:
        return limit
    return math.ceil(limit / k)


def _count(limit: int | float | None, n_docs: int) -> int:
    if limit is None:
        return n_docs
    if isinstance(limit, float) and 0 < limit < 1:
        return min(n_docs, math.ceil(limit * n_docs))
    return min(n_docs, int(limit))


def resolve_limits(
    objects: dict[str, Any], default: int | float | None, overrides: dict[str, int | float | None]
) -> dict[str, int]:
    """Number of documents to evaluate per leaf task (see the module docstring for the rules).

    Args:
        objects: requested name -> loaded lm-eval ``Task`` or ``Group``.
        default: the default limit of a requested name (``eval.limit``).
        overrides: name (task or group, at any depth) -> limit (``eval.task_limits``).

    Returns:
        leaf task name -> number of documents (the first N of its shuffled evaluation split).
    """
    from lm_eval.api.group import Group

    out: dict[str, int] = {}

    def visit(obj: Any, limit: int | float | None) -> None:
        name = obj.name if isinstance(obj, Group) else obj.task_name
        limit = overrides.get(name, limit)
        if isinstance(obj, Group):
            children = list(obj)
            for child in children:
                visit(child, _split(limit, len(children)))
        else:
            out[name] = _count(limit, len(obj.eval_docs))

    for name, obj in objects.items():
        visit(obj, overrides.get(name, default))
    return out


# --------------------------------------------------------------------------------------------------
# Plan: validated tasks, ready to run
# --------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Validated evaluation tasks of one run.

    Attributes:
        names: requested task/group names, in order.
        manager: the ``TaskManager`` (include paths + data metadata).
        objects: requested name -> loaded ``Task``/``Group`` (used once, then reloaded).
        leaves: requested name -> its leaf task names.
        limits: leaf -> number of documents evaluated.
        sizes: leaf -> number of documents available.
        files: name -> YAML file (or ``"lm-eval built-in"``).
        data_dir: the data root passed to the loaders.
        metadata: the ``TaskManager`` metadata.
        fingerprint: hash of the local task files.
        chat: leaf tasks scored in the training chat format (``metadata.grads_chat`` in their YAML).
        size_weighted: requested group -> whether its score pools its leaves' items (else it
            averages the leaves' scores); plain tasks pool trivially.
        chat_system: the system prompt of the chat-formatted tasks (``data.system_prompt``).
    """

    names: list[str]
    manager: Any
    objects: dict[str, Any]
    leaves: dict[str, list[str]]
    limits: dict[str, int]
    sizes: dict[str, int]
    files: dict[str, str]
    data_dir: Path
    metadata: dict[str, str]
    fingerprint: str
    chat: set[str] = field(default_factory=set)
    size_weighted: dict[str, bool] = field(default_factory=dict)
    chat_system: str | None = None

    def fresh_objects(self, names: list[str]) -> dict[str, Any]:
        """Name -> a Task/Group not used by a previous run (lm-eval tasks keep per-run state).

        The objects built during validation are handed out once; later calls rebuild them.
        """
        out = {}
        with quiet_lm_eval():
            for name in names:
                obj = self.objects.pop(name, None)
                out[name] = obj if obj is not None else _top(self.manager.load([name]), name)
        return out

    def samples(self) -> dict[str, list[int]]:
        """``simple_evaluate(samples=...)``: leaf -> indices of the documents to evaluate."""
        return {leaf: list(range(n)) for leaf, n in self.limits.items()}


def _top(loaded: dict, name: str) -> Any:
    if name in loaded["groups"]:
        return loaded["groups"][name]
    if name in loaded["tasks"]:
        return loaded["tasks"][name]
    if len(loaded["tasks"]) == 1 and not loaded["groups"]:
        return next(iter(loaded["tasks"].values()))
    raise TaskConfigError(f"task '{name}' is a tag, not a task or group: list its tasks instead")


def _local_leaves(name: str, index: dict[str, TaskFile]) -> list[str]:
    entry = index.get(name)
    if entry is None or entry.kind == "task":
        return [name]
    return [leaf for m in entry.members for leaf in _local_leaves(m, index)]


def _check_docs(task: Any, leaf: str, file: str, n: int) -> None:
    """Every evaluated document of a multiple-choice task must have choices and a valid gold."""
    if task.get_config("output_type") != "multiple_choice":
        return
    docs = task.eval_docs
    for i in range(min(n, len(docs))):
        doc = docs[i]
        try:
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_target(doc)
        except Exception as exc:  # noqa: BLE001 - any template error is a task-file error
            raise TaskConfigError(
                f"task '{leaf}' ({file}), document {i}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(choices, list) or not choices:
            raise TaskConfigError(f"task '{leaf}' ({file}), document {i}: no choices ({choices!r})")
        golds = gold if isinstance(gold, list) else [gold]
        for g in golds:
            ok = (0 <= g < len(choices)) if isinstance(g, int) else g in choices
            if not ok:
                raise TaskConfigError(
                    f"task '{leaf}' ({file}), document {i}: gold {g!r} is not one "
                    f"of the {len(choices)} choices {choices[:9]}"
                )


def _build_manager(dirs: list[Path], metadata: dict, with_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=[str(d) for d in dirs], include_defaults=with_defaults, metadata=dict(metadata)
    )


def prepare(cfg: Any, names: list[str]) -> Plan:
    """Validate and load the requested tasks; no model is involved.

    Checks, in order: every local task file parses; every name is a local task/group or an lm-eval
    built-in; every group member exists; each task builds (its data files load); no leaf task is
    requested twice; every evaluated document has choices and a valid gold answer.

    Raises:
        TaskConfigError: naming the task and its file.
    """
    cfg = as_dict(cfg)
    ev = eval_settings(cfg)
    names = list(dict.fromkeys(names))
    dirs = include_dirs(cfg)
    index, broken = scan_task_files(dirs)

    def broken_for(name: str) -> list[tuple[Path, str]]:
        return [
            (p, e)
            for p, e in broken.items()
            if p.stem.lstrip("_") == name or name in p.read_text(encoding="utf-8", errors="replace")
        ]

    # 1. local names and group members; names not found locally must be built-ins
    wanted_builtin: list[str] = []

    def check_local(name: str, parent: str | None) -> None:
        if name in index:
            for member in index[name].members:
                check_local(member, name)
            return
        if bad := broken_for(name):
            path, err = bad[0]
            raise TaskConfigError(f"task '{name}': task file {path} is malformed: {err}")
        if name.startswith("grads_"):  # lm-eval has no grads_* built-ins: skip its 10 s index
            where = f" (member of group '{parent}', {index[parent].path})" if parent else ""
            raise TaskConfigError(
                f"unknown evaluation task '{name}'{where}: no task file defines it "
                f"in {[str(d) for d in dirs]}; grads tasks: {sorted(index)}"
            )
        wanted_builtin.append(name)

    for name in names:
        check_local(name, None)

    # leaf tasks defined by local YAMLs (not built-ins referenced by a local group) read data_dir
    local_leaves = {leaf for n in names if n in index for leaf in _local_leaves(n, index)}
    local_leaves &= set(index)
    needs_data = sorted(local_leaves - set(SYNTHETIC_TASKS) - set(HELDOUT_TASKS))
    data_dir = data_dir_of(cfg, required=bool(needs_data))
    if needs_data and not data_dir.is_dir():
        raise TaskConfigError(f"paths.data_dir={data_dir} is not a folder (needed by {needs_data})")
    metadata: dict[str, str] = {"data_dir": str(data_dir)}
    if local_leaves & set(SYNTHETIC_TASKS):
        metadata |= synthetic_metadata(cfg)
    if local_leaves & set(HELDOUT_TASKS):
        metadata |= heldout_metadata(cfg)

    manager = _build_manager(dirs, metadata, with_defaults=bool(wanted_builtin))
    unknown = [n for n in wanted_builtin if n not in manager.all_tasks]
    if unknown:
        hint = "".join(f"\n  unparsable task file {p}: {e}" for p, e in broken.items())
        raise TaskConfigError(
            f"unknown evaluation task(s) {unknown}: not defined in {[str(d) for d in dirs]} nor "
            f"among lm-eval's built-in tasks (grads tasks: {sorted(index)}){hint}"
        )

    files = {n: str(index[n].path) if n in index else "lm-eval built-in" for n in names}

    # 2. build every task (loads its data), naming the failing leaf when a group fails
    objects: dict[str, Any] = {}
    with quiet_lm_eval():
        for name in names:
            try:
                objects[name] = _top(manager.load([name]), name)
            except TaskConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised with the task and file named
                culprit, where = name, files[name]
                for leaf in _local_leaves(name, index) if name in index else []:
                    try:
                        manager.load([leaf])
                    except Exception:  # noqa: BLE001
                        culprit, where = leaf, str(index[leaf].path) if leaf in index else where
                        break
                raise TaskConfigError(
                    f"task '{culprit}' ({where}) failed to load: {type(exc).__name__}: {exc}"
                ) from exc

    # 3. leaves, duplicates, limits, documents
    from lm_eval.api.group import Group

    leaves: dict[str, list[str]] = {}
    tasks: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for name, obj in objects.items():
        leaf_tasks = obj.get_all_tasks() if isinstance(obj, Group) else [obj]
        leaves[name] = [t.task_name for t in leaf_tasks]
        for t in leaf_tasks:
            if t.task_name in seen:
                raise TaskConfigError(
                    f"task '{t.task_name}' is requested twice: by '{seen[t.task_name]}' "
                    f"and by '{name}'"
                )
            seen[t.task_name] = name
            tasks[t.task_name] = t
    limits = resolve_limits(objects, ev["limit"], ev["task_limits"])
    sizes = {leaf: len(t.eval_docs) for leaf, t in tasks.items()}
    for leaf, task in tasks.items():
        file = str(index[leaf].path) if leaf in index else "lm-eval built-in"
        _check_docs(task, leaf, file, limits[leaf])
    return Plan(
        names=names,
        manager=manager,
        objects=objects,
        leaves=leaves,
        limits=limits,
        sizes=sizes,
        files=files,
        data_dir=data_dir,
        metadata=metadata,
        fingerprint=task_fingerprint(dirs),
        chat=_chat_leaves(objects, tasks),
        size_weighted={n: _size_weighted(obj) for n, obj in objects.items()},
        chat_system=(cfg.get("data") or {}).get("system_prompt"),
    )


def _chat_leaves(objects: dict[str, Any], tasks: dict[str, Any]) -> set[str]:
    """Leaf tasks marked ``metadata.grads_chat``; a requested group must not mix the two formats."""
    chat = {leaf for leaf, t in tasks.items() if (t.config.metadata or {}).get("grads_chat")}
    from lm_eval.api.group import Group

    for name, obj in objects.items():
        leaves = {t.task_name for t in obj.get_all_tasks()} if isinstance(obj, Group) else {name}
        if leaves & chat and leaves - chat:
            raise TaskConfigError(
                f"group '{name}' mixes chat-formatted tasks {sorted(leaves & chat)} with plain ones"
            )
    return chat


def _size_weighted(obj: Any) -> bool:
    """Whether a requested group's score pools its items (``weight_by_size: true``)."""
    aggs = getattr(obj, "aggregate_metric_list", None) or []
    return bool(getattr(aggs[0], "weight_by_size", True)) if aggs else True


def heldout_metadata(cfg: Any) -> dict[str, str]:
    """Write the run domain's held-out split (``grads.heldout``) and return its path as metadata.

    Raises:
        TaskConfigError: the domain has no ``heldout`` block or its split cannot be built.
    """
    from grads.heldout import HeldoutConfigError, materialise

    try:
        path = materialise(as_dict(cfg))
    except (HeldoutConfigError, ValueError, OSError) as exc:
        raise TaskConfigError(f"task 'grads_heldout': {exc}") from exc
    return {key: str(path) for key in HELDOUT_TASKS.values()}


def validate_tasks(cfg: Any) -> None:
    """Fail fast, before any model is loaded, if an evaluation task cannot run.

    Loads every task of the run (:func:`part_lists`) with its data, so a missing
    or malformed task file, an unknown task name or a missing data file raises here with the task
    and the file named. Does nothing when ``eval.enabled`` is false.

    Raises:
        TaskConfigError: see :func:`prepare`.
    """
    cfg = as_dict(cfg)
    if not eval_settings(cfg)["enabled"]:
        return
    names = [n for names in part_lists(cfg).values() for n in names]
    if names:
        prepare(cfg, names)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
class _DropNoise(logging.Filter):
    """Drop lm-eval messages that are expected for in-process runs of these tasks."""

    NOISE = (
        "Custom kwargs can be passed",  # once per custom_dataset task
        "Overwriting default num_fewshot",  # once per task when eval.num_fewshot is set
        "num_fewshot has been set to 0",  # tasks pinned to zero-shot
        "model kwarg is not of type `str`",  # HFLM wrapping an in-memory model
        "Passed an already-initialized model",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


_NOISY_LOGGERS = ("lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface")


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Lower lm-eval's log volume (per-task INFO lines, expected warnings) inside the block."""
    root = logging.getLogger("lm_eval")
    old, flt = root.level, _DropNoise()
    root.setLevel(max(level, old))
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(flt)
    try:
        yield
    finally:
        root.setLevel(old)
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(flt)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """simple_evaluate seeds the global RNGs; restore the caller's state afterwards."""
    import numpy as np
    import torch

    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_lm_eval(
    plan: Plan, model: Any, tokenizer: Any, ev: dict, names: list[str] | None = None
) -> dict:
    """Evaluate an in-memory model on (a subset of) the plan's tasks with ``simple_evaluate``.

    Tasks marked ``grads_chat`` run in a second ``simple_evaluate`` call with the model's chat
    template and ``data.system_prompt`` (the training format); the others use the suite's settings.
    Per-item results are kept (``log_samples``) and condensed by :func:`grads.evaluation.items.extract`.

    Args:
        plan: from :func:`prepare`.
        model: a ``transformers`` causal LM (any device; left where it is).
        tokenizer: its tokenizer.
        ev: :func:`eval_settings`.
        names: requested names to run (default: all of the plan's).

    Returns:
        lm-eval's results dict (``results``, ``n-samples``, ...; the two calls merged) plus
        ``items``: leaf task -> per-item arrays (see :mod:`grads.evaluation.items`).
    """
    from grads.evaluation.items import extract

    names = list(names or plan.names)
    is_chat = {n: bool(set(plan.leaves[n]) & plan.chat) for n in names}
    chat = bool(ev["apply_chat_template"])
    runs = [
        (
            [n for n in names if not is_chat[n]],
            chat,
            ev["system_instruction"],
            ev["fewshot_as_multiturn"],
        ),
        ([n for n in names if is_chat[n]], True, plan.chat_system, False),
    ]
    was_training = bool(getattr(model, "training", False))
    model.eval()
    merged: dict[str, Any] = {"results": {}, "n-samples": {}, "groups": {}, "items": {}}
    try:
        with quiet_lm_eval(), preserved_rng():
            lm = hflm_class()(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=int(ev["batch_size"]),
                max_length=ev["max_length"],
            )
            for run_names, apply_chat, system, multiturn in runs:
                if not run_names:
                    continue
                out = _simple_evaluate(plan, lm, ev, run_names, apply_chat, system, multiturn)
                for key in ("results", "n-samples", "groups"):
                    merged[key] |= out.get(key) or {}
                merged["items"] |= extract(out.get("samples") or {}, lm)
                for key, value in out.items():
                    merged.setdefault(key, value)
    finally:
        model.train(was_training)
    merged.pop("samples", None)  # whole documents: condensed into "items"
    return merged


def hflm_class():
    """lm-eval's ``HFLM`` scoring a continuation from the exact end of a newline-ended context.

    lm-eval moves a context's trailing whitespace into the continuation (so that ``"Answer: " +
    "A"`` is tokenised as ``" A"``). A chat-formatted context ends with the assistant header's
    newline; moved, that newline would be scored as the first "response" token, which training
    never supervises (``grads.data.tokenize_record`` ends the prompt after it) and which doubles
    the token count of one-token answers. For contexts ending in a newline the split is therefore
    made at the context's own tokens, when the whole sequence tokenises as context + continuation
    (BPE pre-tokenisers never merge a newline into the next word); otherwise lm-eval's rule applies.
    """
    from lm_eval.models.huggingface import HFLM

    class GradsHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str):
            if context.endswith("\n") and self.backend == "causal":
                ctx = self.tok_encode(context)
                whole = self.tok_encode(context + continuation)
                if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
                    return ctx, whole[len(ctx) :]
            return super()._encode_pair(context, continuation)

    return GradsHFLM


def _simple_evaluate(
    plan: Plan,
    lm: Any,
    ev: dict,
    names: list[str],
    apply_chat: bool,
    system: str | None,
    multiturn: bool | None,
) -> dict:
    from lm_eval.evaluator import simple_evaluate

    objects = plan.fresh_objects(names)
    samples = {
        leaf: idx
        for leaf, idx in plan.samples().items()
        if any(leaf in plan.leaves[n] for n in names)
    }
    seed = int(ev["seed"])
    out = simple_evaluate(
        model=lm,
        tasks=[objects[n] for n in names],
        task_manager=plan.manager,
        num_fewshot=ev["num_fewshot"],
        samples=samples,
        apply_chat_template=apply_chat,
        fewshot_as_multiturn=apply_chat if multiturn is None else bool(multiturn),
        system_instruction=system,
        log_samples=True,
        bootstrap_iters=int(ev["bootstrap_iters"]),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # only rank 0 gets results
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return out


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), wall seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
