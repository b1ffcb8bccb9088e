"""Validation of the requested tasks into a :class:`Plan` (``prepare``), before any model loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grads.config_access import as_dict
from grads.evaluation.limits import resolve_limits
from grads.evaluation.lm_eval_run import quiet_lm_eval
from grads.evaluation.settings import (
    HELDOUT_TASKS,
    SYNTHETIC_TASKS,
    TaskConfigError,
    data_dir_of,
    eval_settings,
    heldout_metadata,
    include_dirs,
    part_lists,
    synthetic_metadata,
)
from grads.evaluation.taskfiles import TaskFile, scan_task_files, task_fingerprint

log = logging.getLogger(__name__)


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
    # 1. local names and group members; names not found locally must be built-ins
    wanted_builtin = _builtin_names(names, index, broken, dirs)
    data_dir, metadata = _task_metadata(cfg, names, index)
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
    objects = _load_objects(manager, names, index, files)
    # 3. leaves, duplicates, limits, documents
    leaves, tasks = _leaf_tasks(objects)
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


def _builtin_names(
    names: list[str], index: dict[str, TaskFile], broken: dict[Path, str], dirs: list[Path]
) -> list[str]:
    """Names (and group members) no local file defines: they must be lm-eval built-ins.

    Raises:
        TaskConfigError: a ``grads_*`` name no file defines, or one whose file is malformed.
    """

    def broken_for(name: str) -> list[tuple[Path, str]]:
        return [
            (p, e)
            for p, e in broken.items()
            if p.stem.lstrip("_") == name or name in p.read_text(encoding="utf-8", errors="replace")
        ]

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
    return wanted_builtin


def _task_metadata(
    cfg: dict, names: list[str], index: dict[str, TaskFile]
) -> tuple[Path, dict[str, str]]:
    """The data root and the ``TaskManager`` metadata the requested local tasks read."""
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
    return data_dir, metadata


def _load_objects(
    manager, names: list[str], index: dict[str, TaskFile], files: dict[str, str]
) -> dict[str, Any]:
    """Requested name -> its loaded Task/Group; a failure names the failing leaf and its file."""
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
    return objects


def _leaf_tasks(objects: dict[str, Any]) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Requested name -> its leaf names, and leaf -> task; a leaf requested twice raises."""
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
    return leaves, tasks


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
