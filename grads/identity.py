"""The parts of the stage keys: what each stage's output depends on (:class:`StageSpec`) and
the parts computed from the resolved config (pool, data, trainer, features, selection,
evaluation). Each stage declares its spec beside its run (:mod:`grads.stages`); hashing and
content fingerprints are :mod:`grads.hashing`, the trainer's part
:mod:`grads.training.identity`, the evaluation's :mod:`grads.evaluation.identity`.

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

Cache versions (bump :data:`CACHE_VERSION` when a stage's output changes meaning):

* 1: keys hashed config sections; data files by base name only.
* 2: keys hash data *content* (pool sources, their sibling files, decontamination files, generated
  domains, eval data files, task files, model weights of ``gguf``/``local`` sources); the trainer
  part is :func:`trainer_identity` (global batch always, the micro-batch layout only when LoRA
  dropout makes it matter; resolved dtype; DeepSpeed template content); ``data.num_proc`` and
  ``domain.hub_datasets`` (never read) and ``trainer.gradient_checkpointing`` (same maths) left out.
  Every v1 entry misses; ``grads-cache gc`` removes them. Later knobs join a key only away from
  their default (:data:`UNKEYED_DEFAULTS`; ``trainer.autocast``: as ``"autocast": "bf16"`` when on), so
  v2 keys stay valid.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from grads.evaluation.identity import eval_data_identity, task_files_identity
from grads.hashing import NON_SEMANTIC, Fingerprints, referenced_files, relative_path, without
from grads.training.identity import trainer_identity

log = logging.getLogger(__name__)

CACHE_VERSION = 2

# Top-level sections some stage part reads (every other top-level key must be in NON_SEMANTIC[""]).
KEYED_SECTIONS = frozenset(
    {"model", "domain", "data", "trainer", "warmup", "finetune", "features", "selector", "budget"}
    | {"seed", "eval", "select"}
)
# Eval knobs keyed through what they resolve to (task lists, task files), not as written.
EVAL_BY_CONTENT = frozenset({"general_tasks", "general_tasks_hub", "include_paths"})
# Domain knobs the evaluate stage reads through grads.evaluation.task_lists.
DOMAIN_EVAL_FIELDS = ("eval_tasks", "eval_tasks_general", "eval_tasks_hub")


# --------------------------------------------------------------------------------------------------
# Parts: model, pool, data, trainer
# --------------------------------------------------------------------------------------------------


def _reader_fn(spec: Mapping) -> Callable | None:
    reader = spec.get("reader")
    if not reader:
        return None  # inferred readers (jsonl/json/csv/tsv/parquet) read only their own file
    from grads.data.readers import READERS

    return READERS.get(reader)


def _builder_files(spec: Mapping) -> list[Path] | None:
    """Files a source with its own ``builder`` reads, if its module says (``pool_files(path, format)``
    returning ``[(file, format), ...]``, as :mod:`grads.data.custom_pool` does); it also validates."""
    module = str(spec.get("builder") or "").rpartition(".")[0]
    files_fn = getattr(importlib.import_module(module), "pool_files", None) if module else None
    if files_fn is None:
        return None
    return [Path(f) for f, _ in files_fn(spec.get("path"), spec.get("format") or "auto")]


def file_spec_identity(spec: Mapping, fp: Fingerprints, what: str) -> dict:
    """A source / decontamination spec with its ``path`` replaced by the content it reads.

    Hub sources (``hub_id`` without ``path``) are kept as configured (pin ``revision``).
    """
    ident = without(spec, {"path"})
    built = _builder_files(spec)
    if built is not None:
        root = Path(str(spec["path"])).expanduser()
        ident["content"] = {
            relative_path(f, [root] if root.is_dir() else []): fp.path(f) for f in built
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
        from grads.data.pool import materialise_generated

        materialise_generated(dom, cfg)
    skip = NON_SEMANTIC["domain"] | set(DOMAIN_EVAL_FIELDS)
    ident = without(dom, skip | {"sources", "generator", "decontaminate"})
    ident["sources"] = [
        file_spec_identity(s, fp, "data source")
        for s in dom.get("sources") or []
        if s.get("enabled", True) is not False
    ]
    ident["generator"] = without(dom.get("generator"), {"out_dir"}) or None
    ident["decontaminate"] = [
        file_spec_identity(d, fp, "decontamination file") for d in dom.get("decontaminate") or []
    ]
    return ident


def data_identity(cfg: Mapping) -> dict:
    """The ``data`` section (tokenisation, filtering) minus knobs nobody reads."""
    return without(cfg.get("data"), NON_SEMANTIC["data"])


def train_identity(cfg: Mapping, use: str) -> dict:
    """:func:`trainer_identity` of ``cfg.trainer`` merged with ``cfg[use]``, as the trainer sees it."""
    from grads.training import TrainerSettings

    s = TrainerSettings.from_cfg(dict(cfg), use)
    return trainer_identity(s, s.resolved_procs())


# --------------------------------------------------------------------------------------------------
# Parts: evaluation
# --------------------------------------------------------------------------------------------------


def eval_identity(cfg: Mapping, fp: Fingerprints) -> dict:
    """The evaluate stage's settings, effective task lists, task files and eval data."""
    from grads.evaluation.settings import eval_settings, task_lists

    ev = eval_settings(dict(cfg))
    domain, general = task_lists(dict(cfg))
    ident: dict[str, Any] = {
        # Task lists enter as the effective lists below, task folders through their files' content.
        "eval": without(ev, NON_SEMANTIC["eval"] | EVAL_BY_CONTENT),
        "domain_tasks": domain,
        "general_tasks": general,
    }
    if ev["enabled"] and (domain or general):
        ident["task_files"] = task_files_identity(cfg, domain + general)
        ident["eval_data"] = eval_data_identity(cfg, domain + general, fp)
    return ident


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
Part = Callable[[Mapping, Fingerprints], Any]


# Knobs added after cache version 2 pinned its keys: keyed only away from their default, so the keys
# of every run made before them stay valid (trainer.autocast is handled in trainer_identity).
UNKEYED_DEFAULTS: dict[str, dict[str, Any]] = {"features": {"ifd_answer": "text"}}


def section_part(name: str) -> Part:
    late = UNKEYED_DEFAULTS.get(name, {})

    def part(cfg: Mapping, fp: Fingerprints) -> dict:
        d = without(cfg.get(name), NON_SEMANTIC.get(name, ()))
        return {k: v for k, v in d.items() if not (k in late and v == late[k])}

    return part


# A part that returns OMIT is left out of the identity: parts added after cache version 2 pinned
# its keys, keyed only when set, so the keys of every run made before them stay valid.
OMIT: Any = object()


def balance_part(cfg: Mapping, fp: Fingerprints) -> Any:
    """``select.balance`` (grads.selectors.balance), keyed only when set."""
    by = (cfg.get("select") or {}).get("balance")
    return by if by else OMIT


def budget_part(cfg: Mapping, fp: Fingerprints) -> Any:
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


COMMON_SUMMARY = ("model.name", "domain.name", "domain.pool_limit")
