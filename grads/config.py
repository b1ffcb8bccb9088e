"""Validation of a composed run config, done once before any stage runs (``grads.pipeline.run``).

Hydra rejects an unknown key only in a plain ``key=value`` override: a ``+key=value`` override, a
key in an experiment file or a YAML typo merges silently, and a bad value surfaces hours later (or
never). :func:`validate_config` closes that gap in well under a second and reports every problem at
once, each naming the key and what is allowed.

Where the rules come from, so that adding a knob is a one-place change:

* **Allowed keys** of ``data``, ``features``, ``warmup``, ``finetune`` and the top level are the keys
  of ``conf/config.yaml``; those of a group node (``domain``, ``eval``, ``model``, ``paths``,
  ``trainer``) are the union of the keys of every option file of that group, plus the knobs the
  consuming code declares (``TrainerSettings`` fields, ``EVAL_DEFAULTS``, ``grads.models.MODEL_KEYS``,
  ``grads.data.records.SOURCE_KEYS`` / ``DECONTAMINATE_KEYS``). A knob added to a YAML is known at once.
* **Targets** (``selector``, ``budget``, ``logger``, ``domain.generator``) are checked by binding
  the node's keys to the ``_target_``'s signature, then the budget and selector are instantiated
  (cheap) so their own checks run, including ``budget=auto`` for a selector that cannot size itself.
* **Values**: the owning code's validators (``TrainerSettings.from_cfg`` for ``warmup`` and
  ``finetune``, ``eval_settings``), the explicit range rules in :data:`RULES`, and for the knobs of
  ``conf/config.yaml`` the type of their YAML default (an int stays an int, a bool a bool).

Defaults live in the YAML only: code that runs without a composed config (tests, scripts, direct
API calls) reads them with :func:`defaults`. Paths: every ``paths.*`` value becomes absolute here,
relative to the directory grads was started from (see ``conf/paths/default.yaml``), before the rest
of the config is resolved, so every interpolation of a path sees the absolute value.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from grads.config_access import PACKAGED_INTO, load_node, option_defaults, primary_config
from grads.constants import PATH_ENV, STAGES, conf_dir
from grads.errors import UserError

log = logging.getLogger(__name__)

# Nodes of conf/config.yaml whose knobs are checked against its keys and default types.
PRIMARY_NODES = ("data", "features", "warmup", "finetune", "select", "export")
# Group nodes whose keys are the union over their option files (+ what the code declares).
UNION_GROUPS = ("domain", "eval", "model", "paths", "trainer")
TRAIN_USES = ("warmup", "finetune")


class ConfigError(UserError, ValueError):
    """One or more config problems; the message lists each as ``key: problem (allowed ...)``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} config problem(s), nothing was run:\n{lines}")


# --------------------------------------------------------------------------------------------------
# Value rules: each returns a problem (what is allowed) or None
# --------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def int_rule(lo: int | None = None, nullable: bool = False, also: tuple = ()) -> Callable:
    """An integer (``>= lo``), or one of ``also`` (e.g. ``-1`` meaning "off"), or null."""

    def check(v: Any) -> str | None:
        if (v is None and nullable) or (v in also and _is_int(v)):
            return None
        if _is_int(v) and (lo is None or v >= lo):
            return None
        want = "an integer" + (f" >= {lo}" if lo is not None else "")
        want += "".join(f" or {a}" for a in also) + (" or null" if nullable else "")
        return f"expected {want}, got {v!r}"

    return check


def number_rule(gt: float | None = None) -> Callable:
    """A number (int or float, not a bool), ``> gt`` when given."""

    def check(v: Any) -> str | None:
        if _is_num(v) and (gt is None or v > gt):
            return None
        return f"expected a number{f' > {gt}' if gt is not None else ''}, got {v!r}"

    return check


def choice_rule(*allowed: Any) -> Callable:
    """One of ``allowed`` (``True`` matches only ``True``, not ``1``)."""

    def check(v: Any) -> str | None:
        ok = any(v is a if isinstance(a, bool) or a is None else v == a for a in allowed)
        return None if ok else f"expected one of {list(allowed)}, got {v!r}"

    return check


def _representations_rule(v: Any) -> str | None:
    from grads.features.representations import PASSES

    if v == "auto" or (isinstance(v, list) and all(p in PASSES for p in v)):
        return None
    return f"expected 'auto' or a list drawn from {list(PASSES)}, got {v!r}"


def _export_format_rule(v: Any) -> str | None:
    from grads.export.formats import format_problem

    return format_problem(v)


def _stages_rule(v: Any) -> str | None:
    if isinstance(v, list) and v and all(s in STAGES for s in v):
        return None
    return f"expected a non-empty list drawn from {list(STAGES)}, got {v!r}"


# Range and choice rules that a YAML default's type cannot express. `*` = trainer, warmup, finetune.
RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": int_rule(),
    "stages": _stages_rule,
    "data.max_seq_len": int_rule(lo=2),
    "data.min_response_tokens": int_rule(lo=0),
    "data.on_bad_row": choice_rule("error", "skip"),
    "data.num_proc": int_rule(lo=1),
    "features.batch_size": int_rule(lo=1),
    "features.procs": int_rule(lo=1),
    "features.chunk_bytes": int_rule(lo=1),
    "features.chunk_size": int_rule(lo=1),
    "features.ifd": choice_rule(True, False, "auto"),
    "features.padding_side": choice_rule("left", "right", None),
    "features.num_threads": int_rule(lo=1, nullable=True),
    "features.representations": _representations_rule,
    "select.balance": choice_rule(None, "answer", "source"),
    "export.enabled": choice_rule("auto", True, False),
    "export.format": _export_format_rule,
    "export.concentration_warning": number_rule(gt=0),
    "domain.pool_limit": int_rule(lo=1, nullable=True),
    "domain.pool_seed": int_rule(),
    # max_steps=0 used to mean "no limit" silently; -1 is the documented "off".
    "*.max_steps": int_rule(lo=1, also=(-1,)),
    "*.epochs": number_rule(gt=0),
    "*.seed": int_rule(nullable=True),
}


# --------------------------------------------------------------------------------------------------
# Where the allowed keys come from
# --------------------------------------------------------------------------------------------------


@functools.cache
def _group_keys(conf: str, group: str) -> frozenset[str]:
    keys: set[str] = set()
    for f in sorted((Path(conf) / group).glob("*.yaml")):
        keys |= {k for k in load_node(f) if k != "defaults"}
    return frozenset(keys)


def _primary_groups(conf: str) -> list[str]:
    """Group names of the primary defaults list (``optional local`` -> ``local``)."""
    names = []
    for entry in primary_config(conf).get("defaults") or []:
        if isinstance(entry, dict):
            name = next(iter(entry)).replace("optional ", "").replace("override ", "")
            if "/" not in name:  # hydra/help etc. are Hydra's own
                names.append(name)
    return names


def _code_keys(group: str) -> set[str]:
    """Knobs the consuming code reads although no option file of the group sets them."""
    if group == "trainer":
        import dataclasses

        from grads.training import TrainerSettings

        return {f.name for f in dataclasses.fields(TrainerSettings)}
    if group == "eval":
        from grads.evaluation.settings import EVAL_DEFAULTS

        return set(EVAL_DEFAULTS)
    if group == "model":
        from grads.models import MODEL_KEYS

        return set(MODEL_KEYS)
    if group == "domain":
        from grads.data.pool import DOMAIN_KEYS

        return set(DOMAIN_KEYS)
    return set()


def allowed_keys(node: str) -> set[str]:
    """The keys a node of the composed config may hold (``""`` is the top level)."""
    conf = str(conf_dir())
    primary = primary_config(conf)
    if node == "":
        # experiment and local files are `@package _global_`: no key of their own at the top level.
        packaged = {g for gs in PACKAGED_INTO.values() for g in gs}
        groups = set(_primary_groups(conf)) - {"experiment", "local"} - packaged
        return {k for k in primary if k not in ("defaults", "hydra")} | groups
    keys = (set(_group_keys(conf, node)) | _code_keys(node)) if node in UNION_GROUPS else set()
    if isinstance(primary.get(node), dict):
        keys |= set(primary[node])
    if node in TRAIN_USES:  # any trainer knob may be overridden per use
        keys |= allowed_keys("trainer")
    return keys


# --------------------------------------------------------------------------------------------------
# Checks: each returns a list of problems
# --------------------------------------------------------------------------------------------------
def _unknown(where: str, keys: Any, allowed: set[str]) -> list[str]:
    problems = []
    shown = sorted(a for a in allowed if not a.startswith("_"))
    for key in keys:
        if str(key).startswith("_") or key in allowed:
            continue
        hint = difflib.get_close_matches(str(key), shown, n=1)
        problems.append(
            f"{where}{key}: unknown key"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; allowed: {shown}"
        )
    return problems


def check_keys(cfg: dict) -> list[str]:
    """Unknown keys at the top level, in the primary nodes, the group nodes and domain lists."""
    from grads.data.records import DECONTAMINATE_KEYS, SOURCE_KEYS

    problems = _unknown("", cfg, allowed_keys(""))
    for node in (*PRIMARY_NODES, *UNION_GROUPS):
        if isinstance(cfg.get(node), dict):
            problems += _unknown(f"{node}.", cfg[node], allowed_keys(node))
    domain = cfg.get("domain") if isinstance(cfg.get("domain"), dict) else {}
    for name, keys in (("sources", SOURCE_KEYS), ("decontaminate", DECONTAMINATE_KEYS)):
        for i, item in enumerate(domain.get(name) or []):
            if isinstance(item, dict):
                problems += _unknown(f"domain.{name}[{i}].", item, set(keys))
    return problems


def _get_path(cfg: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _type_problem(default: Any, value: Any) -> str | None:
    """The type a conf/config.yaml default implies (null and interpolated defaults imply none)."""
    if value is None or default is None or (isinstance(default, str) and "${" in default):
        return None
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = _is_int(value), "an integer"
    elif isinstance(default, float):
        ok, want = _is_num(value), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, list):
        ok, want = isinstance(value, list), "a list"
    else:
        return None
    return None if ok else f"expected {want}, got {value!r}"


def check_values(cfg: dict) -> list[str]:
    """:data:`RULES`, then the types of conf/config.yaml's defaults for the other knobs."""
    problems, ruled = [], set()
    for key, rule in RULES.items():
        paths = [key.replace("*", n) for n in ("trainer", *TRAIN_USES)] if "*" in key else [key]
        for path in paths:
            ruled.add(path)
            present, value = _get_path(cfg, path)
            if path.endswith(".seed") and value == cfg.get("seed"):
                continue  # ${seed} interpolated: reported once, at `seed`
            if present and (problem := rule(value)):
                problems.append(f"{path}={value!r}: {problem}")
    primary = primary_config(str(conf_dir()))
    flat = [(k, v) for k, v in primary.items() if not isinstance(v, dict) and k != "defaults"]
    for node in PRIMARY_NODES:
        flat += [(f"{node}.{k}", v) for k, v in (primary.get(node) or {}).items()]
    for path, default in flat:
        present, value = _get_path(cfg, path)
        if path not in ruled and present and (problem := _type_problem(default, value)):
            problems.append(f"{path}={value!r}: {problem}")
    return problems


def _bind(where: str, target: Callable, kwargs: dict) -> list[str]:
    """Bind ``kwargs`` to ``target``'s signature: unknown and missing arguments, named."""
    try:
        inspect.signature(target).bind(**kwargs)
        return []
    except TypeError as exc:
        params = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return [f"{where}: {exc}"]
        unknown = _unknown(f"{where}.", [k for k in kwargs if k not in params], set(params))
        return unknown or [f"{where}: {exc} (accepted: {sorted(params)})"]


def _target_of(where: str, node: Any) -> tuple[Any, dict, list[str]]:
    from hydra.utils import get_object

    if not isinstance(node, dict) or not node.get("_target_"):
        return None, {}, [f"{where}: expected a node with a _target_, got {node!r}"]
    try:
        target = get_object(str(node["_target_"]))
    except Exception as exc:  # ImportError, AttributeError: a wrong class path
        return None, {}, [f"{where}._target_={node['_target_']!r}: cannot import ({exc})"]
    kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
    return target, kwargs, _bind(where, target, kwargs)


def check_targets(cfg: dict) -> list[str]:
    """Bind selector, budget and logger; build the budget and selector so their checks run."""
    built: dict[str, Any] = {}
    problems: list[str] = []
    for where in ("selector", "budget", "logger"):
        if cfg.get(where) is None and where == "logger":
            continue
        target, kwargs, bad = _target_of(where, cfg.get(where))
        problems += bad
        if bad or where == "logger":  # a logger may open files or sockets: bind it only
            continue
        try:
            built[where] = target(**kwargs)
        except (ValueError, TypeError) as exc:
            problems.append(f"{_culprit(where, kwargs)} ({_short(cfg[where])}): {exc}")
    budget, selector = built.get("budget"), built.get("selector")
    auto = budget is not None and getattr(budget, "is_auto", False)
    if auto and selector is not None and not getattr(selector, "supports_auto", False):
        problems.append(
            f"budget=auto: selector '{cfg['selector'].get('name')}' cannot choose its own "
            f"size; allowed with auto: {_auto_selectors()} (or a sized budget such as p5, n100)"
        )
    return problems


def _culprit(where: str, kwargs: dict) -> str:
    """The key a constructor error is about: a budget's ``value`` unless its ``kind`` is wrong."""
    if where != "budget":
        return where
    from grads.selectors.budget import KINDS

    return "budget.kind" if kwargs.get("kind") not in KINDS else "budget.value"


def _short(node: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in node.items() if not str(k).startswith("_"))


def _auto_selectors() -> list[str]:
    """The selector options that accept ``budget=auto`` (only computed for the error message)."""
    from hydra.utils import get_object

    names, conf = [], str(conf_dir())
    for f in sorted((Path(conf) / "selector").glob("*.yaml")):
        node = option_defaults(conf, "selector", f.stem)
        try:
            kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
            if getattr(get_object(node["_target_"])(**kwargs), "supports_auto", False):
                names.append(f.stem)
        except Exception:  # noqa: S112  (a broken option is reported when it is used)
            continue
    return names


def check_trainer(cfg: dict) -> list[str]:
    """``TrainerSettings.from_cfg`` for both uses: the trainer's own checks, before the warm-up."""
    from grads.training import TrainerSettings

    problems = []
    for use in TRAIN_USES:
        try:
            TrainerSettings.from_cfg(cfg, use)
        except (ValueError, TypeError) as exc:
            problems.append(f"trainer + {use}: {exc}")
    return problems


def check_eval(cfg: dict) -> list[str]:
    """``eval_settings``: the evaluation module's own value checks (tasks_from, metric, limits)."""
    from grads.evaluation.settings import eval_settings

    try:
        eval_settings(cfg)
    except ValueError as exc:
        return [str(exc)]
    return []


def check_domain(cfg: dict) -> list[str]:
    """The generator's arguments, each source's templates, and (when a stage will read the pool)
    that every source and decontamination file exists."""
    domain = cfg.get("domain") or {}
    problems = []
    gen = domain.get("generator")
    if gen:
        from grads.data.synthetic import materialise

        problems += _bind("domain.generator", materialise, dict(gen))
    from grads.data.heldout import HeldoutConfigError, heldout_config

    try:
        heldout_config(domain)
    except HeldoutConfigError as exc:
        problems.append(f"domain.heldout: {exc}")
    for i, src in enumerate(domain.get("sources") or []):
        if src.get("builder"):  # its own reader checks its own knobs (templates may be detected)
            problems += _builder_problems(f"domain.sources[{i}]", src)
            continue
        for key in ("prompt", "response"):
            if not isinstance(src.get(key), str) or not src[key].strip():
                problems.append(f"domain.sources[{i}].{key}: expected a template string")
    if gen or not {"warmup", "features"} & set(cfg.get("stages") or STAGES):
        return problems  # generated files appear at run time; no stage reads the pool
    return problems + _missing_domain_files(domain, (cfg.get("paths") or {}).get("data_dir"))


def _missing_domain_files(domain: dict, data_dir: Any) -> list[str]:
    """The domain's source and decontamination files that do not exist. Only a file under the
    data root blames the data root; any other (``domain.path``, a path of your own) is named as
    the missing path it is."""
    files = [
        (f"domain.{name}[{i}].path", str(item["path"]))
        for name in ("sources", "decontaminate")
        for i, item in enumerate(domain.get(name) or [])
        if item.get("enabled", True) and item.get("path")
    ]
    root = Path(_absolute(data_dir)) if data_dir else None
    under = [f for f in files if root and Path(_absolute(f[1])).is_relative_to(root)]
    if root and under and not root.is_dir():  # one problem, not one per file
        return [
            f"paths.data_dir={data_dir}: not a folder; the domain '{domain.get('name')}' reads its "
            "files from it (set GRADS_DATA_DIR or paths.data_dir; the default is "
            "../shared/data beside the repository)"
        ]
    problems = []
    for key, path in files:
        if Path(path).exists():
            continue
        given = domain.get("path")
        if given and _absolute(given) == _absolute(path):  # the custom domain's pool
            resolved = "" if str(given) == path else f" ({path})"
            problems.append(f"domain.path: {given} does not exist{resolved}")
        elif (key, path) in under:
            problems.append(
                f"{key}: file not found: {path} (paths.data_dir={data_dir}; "
                "set GRADS_DATA_DIR or paths.data_dir to the folder holding the shared data)"
            )
        else:
            problems.append(f"{key}: file not found: {path}")
    return problems


def _builder_problems(where: str, src: dict) -> list[str]:
    """A source with its own ``builder``: the builder must import, and its module's
    ``check_source(source) -> [problem, ...]`` (when it has one) checks the source's knobs without
    reading the pool, e.g. :func:`grads.data.custom_pool.check_source` (templates are optional there:
    left null, they are detected from the pool's fields, or the records are chat turns)."""
    import importlib

    module, _, func = str(src["builder"]).rpartition(".")
    try:
        mod = importlib.import_module(module)
        getattr(mod, func)
    except (ImportError, AttributeError, ValueError) as exc:
        return [f"{where}.builder={src['builder']!r}: cannot import ({exc})"]
    check = getattr(mod, "check_source", None)
    return list(check(src)) if check else []  # its problems name the keys users set


def _env_problems() -> list[str]:
    """``GRADS_DATA_DIR=`` (set but empty) would silently mean the working directory."""
    return [
        f"{var} is set but empty (paths.{key}): unset it to use the default, or set it to a folder"
        for key, var in PATH_ENV.items()
        if var in os.environ and not os.environ[var].strip()
    ]


def _unset_data_dir(cfg: Any) -> list[str]:
    """An installed grads has no default data folder (``grads.constants.default_data_dir``): a
    domain whose files live under ``${paths.data_dir}`` needs ``GRADS_DATA_DIR``, said before the
    paths turn into ``None/...``. Synthetic and custom pools do not refer to it."""
    if not isinstance(cfg, DictConfig) or OmegaConf.select(cfg, "paths.data_dir") is not None:
        return []
    node = cfg.get("domain")
    domain = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else {}
    if "paths.data_dir" not in str(domain):
        return []
    return [
        f"paths.data_dir is not set: the domain '{domain.get('name')}' reads its files from it, and "
        "an installed grads has no default data folder; set GRADS_DATA_DIR=/path/to/data (or "
        "paths.data_dir=/path/to/data) to the folder holding the domains' data"
    ]


def _absolute(value: Any) -> str:
    return os.path.abspath(os.path.expanduser(str(value)))


def absolute_paths(cfg: Any) -> Any:
    """Make every ``paths.*`` absolute (relative to the working directory), in order, so that
    ``cache_dir: ${paths.output_dir}/cache`` sees the absolute ``output_dir``; a relative file
    path written into ``domain.sources`` / ``domain.decontaminate`` is made absolute the same way.

    A ``DictConfig`` is updated in place before anything else is resolved (every interpolation of a
    path then yields an absolute path); a plain dict is returned as an updated copy.
    """
    import contextlib
    import copy

    problems = []
    plain = not isinstance(cfg, DictConfig)
    cfg = copy.deepcopy(dict(cfg)) if plain else cfg
    with contextlib.ExitStack() as stack:
        if not plain:
            stack.enter_context(read_write(cfg))
            stack.enter_context(open_dict(cfg))
        paths = cfg.get("paths") or {}
        for key in list(paths.keys()):
            value = paths[key]
            if value is None and key == "data_dir":
                continue  # installed and GRADS_DATA_DIR unset: only runs that read data need it
            if value is None or not str(value).strip():
                problems.append(f"paths.{key}={value!r}: expected a folder path")
            else:
                paths[key] = _absolute(value)
        domain = cfg.get("domain") or {}
        for name in ("sources", "decontaminate"):
            for item in domain.get(name) or []:
                path = item.get("path") if hasattr(item, "get") else None
                if isinstance(path, str) and path.strip() and not os.path.isabs(path):
                    item["path"] = _absolute(path)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate_config(cfg: Any) -> Any:
    """Check a composed config and make its paths absolute; call once before any stage runs.

    Args:
        cfg: the composed ``DictConfig`` (or a resolved dict).

    Returns:
        ``cfg`` with absolute ``paths.*`` (a ``DictConfig`` is updated in place).

    Raises:
        ConfigError: every problem found, each naming the key and what is allowed.
    """
    problems = _env_problems() + _unset_data_dir(cfg)
    if problems:
        raise ConfigError(problems)
    cfg = absolute_paths(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    problems = check_keys(resolved) + check_values(resolved)
    problems += check_targets(resolved) + check_domain(resolved)
    from grads.launch import dist_problems

    problems += dist_problems(resolved)  # dist.*: several nodes (grads.launch)
    # The owners' own checks, unless their keys were already reported (no double reports).
    if not any(p.startswith(("trainer.", "warmup.", "finetune.")) for p in problems):
        problems += check_trainer(resolved)
    if not any(p.startswith("eval.") for p in problems):
        problems += check_eval(resolved)
    if problems:
        raise ConfigError(problems)
    return resolve_heldout(cfg, resolved)


def resolve_heldout(cfg: Any, resolved: dict) -> Any:
    """Settle ``domain.heldout`` for this run (:func:`grads.evaluation.settings.resolve_for_run`): a split kept
    only where it is measured (the custom domain's) becomes a plain block or null, in ``cfg``."""
    from grads.evaluation.settings import resolve_for_run

    domain = resolved.get("domain")
    if not isinstance(domain, dict) or "heldout" not in domain:
        return cfg
    value = resolve_for_run(resolved)
    if value == domain["heldout"]:
        return cfg
    domain["heldout"] = value
    if isinstance(cfg, DictConfig):
        with read_write(cfg), open_dict(cfg):
            cfg.domain.heldout = value
    else:
        cfg["domain"]["heldout"] = value
    return cfg


def compose_resolved(overrides: list[str], validate: bool = True) -> dict:
    """The pipeline config for ``overrides`` composed outside a Hydra app (scripts, ``grads-cache``):
    the config folder of :func:`grads.constants.conf_dir`, checked and with absolute paths by
    :func:`validate_config` (unless ``validate=False``: then only ``domain.heldout`` is settled, as
    :func:`resolve_heldout` does for a run), resolved to a plain dict."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if validate:
        cfg = validate_config(cfg)
    resolved: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    if not validate:  # unchecked, but the pool is the one a run would build (its cache keys)
        try:
            resolve_heldout(resolved, resolved)
        except ValueError as exc:  # a bad eval block: the run itself would report it
            log.debug("held-out split not settled: %s", exc)
    return resolved
