"""Which pipeline jobs a verdict runs, and the config of each.

From the composed config, :func:`prepare_base` builds the one resolved config every job derives from:
the held-out split set aside (when the domain has none), the lean evaluation, the features options
shared by every compared selector, ``warmup.seed`` pinned and the per-job export off (the verdict
exports the winner itself). :func:`job_config` then varies only the selector, the seed and, for the
reference, the budget, so every job after the first reads the warm-up and the features from the
stage cache (their keys hash neither the selector nor the seed).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

from grads.config import ConfigError
from grads.verdict.settings import HELDOUT_FRACTION, HELDOUT_MAX, VerdictSettings

log = logging.getLogger(__name__)

SELECT_STAGES = ["warmup", "features", "select"]
ALL_STAGES = ["warmup", "features", "select", "finetune", "evaluate"]
# The two metrics the verdict reads (grads.evaluation.metrics.ITEM_METRICS).
LOSS, FORGET = "domain_bpb", "general_kl"


@dataclasses.dataclass
class Job:
    """One pipeline job of the verdict.

    Attributes:
        name: its folder under ``jobs/``.
        label: the method name its rows carry (``grads``, ``grads+answer_balanced``, ``random``).
        role: ``compared`` or ``reference``.
        seed: the job's seed (selection and fine-tune).
        cfg: the resolved pipeline config.
        size: the compared subset size a reference job matches (None for compared jobs).
    """

    name: str
    label: str
    role: str
    seed: int
    cfg: dict
    size: int | None = None


# --------------------------------------------------------------------------------------------------
# The base config
# --------------------------------------------------------------------------------------------------
def heldout_default(n_candidates: int) -> int:
    """The held-out size a pool of ``n_candidates`` distinct samples gets: ``min(300, 10 %)``."""
    return max(1, min(HELDOUT_MAX, round(HELDOUT_FRACTION * n_candidates)))


def ensure_heldout(base: dict, s: VerdictSettings) -> dict:
    """Give ``base["domain"]`` a held-out split when it has none; describe the split.

    Raises:
        ConfigError: the split would leave less than half of the pool.
    """
    from grads.data.heldout import candidates, heldout_config

    dom = base["domain"]
    spec = heldout_config(dom)
    if dom.get("name") == "custom":
        # a custom pool's default split (5 %, for the domain loss of plain runs) is replaced by the
        # verdict's larger one: the paired CIs are over these items
        dom["heldout"], spec = None, None
    if spec is not None:
        if s.heldout is not None:
            log.warning(
                "verdict.heldout=%s ignored: domain '%s' has its own held-out split (n=%s)",
                s.heldout,
                dom.get("name"),
                spec["n"],
            )
        return {"n": spec["n"], "source": "domain"}
    n_pool = len(candidates(dom, base.get("data")))
    n = s.heldout or heldout_default(n_pool)
    if 2 * n > n_pool:
        raise ConfigError(
            [
                f"verdict.heldout={n}: the pool has {n_pool} distinct samples, so the held-out "
                "split would leave less than half of it to select from (set a smaller verdict.heldout)"
            ]
        )
    dom["heldout"] = {"n": int(n)}
    how = "verdict.heldout" if s.heldout else f"min({HELDOUT_MAX}, 10 % of {n_pool})"
    return {"n": int(n), "source": how, "pool_candidates": n_pool}


def lean_eval(base: dict) -> None:
    """Keep only the log-likelihood parts the verdict reads: no accuracy tasks, no plain text.

    The held-out part (``eval.domain_loss_tasks``) and the reference answers with their KL
    (``eval.ref_tasks``, ``eval.kl_task``) keep the suite's items and limits, so the base model's
    cached results of those parts are shared with full-suite runs of the same suite.
    """
    ev, dom = base["eval"], base["domain"]
    for key in ("general_tasks", "general_tasks_hub", "text_tasks"):
        ev[key] = []
    for key in ("eval_tasks", "eval_tasks_general", "eval_tasks_hub"):
        dom[key] = []


def check_eval(base: dict) -> dict:
    """The evaluation must produce held-out bpb and KL; returns its held-out and KL task names.

    Raises:
        ConfigError: evaluation off, no held-out task or no KL task (naming the key).
    """
    from grads.evaluation.settings import eval_settings, part_lists

    ev = eval_settings(base)
    problems = []
    if not ev["enabled"]:
        problems.append(f"eval={ev['name']}: the verdict evaluates every job; use eval=quick")
        return _raise_or(problems, {})
    parts = part_lists(base)
    if not parts.get("domain_loss"):
        problems.append(
            "eval.domain_loss_tasks lists no held-out task the domain can score (grads_heldout)"
        )
    if not ev["kl_task"]:
        problems.append("eval.kl_task=null: the verdict reads KL(base || tuned); use eval=quick")
    return _raise_or(problems, {"heldout_tasks": parts["domain_loss"], "kl_task": ev["kl_task"]})


def _raise_or(problems: list[str], value: dict) -> dict:
    if problems:
        raise ConfigError(problems)
    return value


def selector_node(name: str, composed: dict) -> dict:
    """The ``selector`` node of option ``name`` (the composed node, overrides included, when it
    is the composed selector); composed with Hydra like ``selector=<name>`` would."""
    if name == composed.get("name"):
        return copy.deepcopy(composed)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from grads.constants import conf_dir

    if GlobalHydra.instance().is_initialized():  # inside the grads-verdict app
        cfg = compose("config", overrides=[f"selector={name}"])
    else:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"selector={name}"])
    return OmegaConf.to_container(cfg.selector, resolve=True)  # type: ignore[return-value]


def share_features(base: dict, nodes: list[dict]) -> None:
    """One features table for every job: the IFD, per-token statistics and representation passes
    any of the verdict's selectors needs are switched on for all (else each would key its own)."""
    from hydra.utils import instantiate

    from grads.selectors.base import traits

    feats = base.setdefault("features", {})
    needs, passes = set(), []
    for node in nodes:
        sel = instantiate(node)
        needs |= set(getattr(sel, "requires", ()) or ())
        passes += list(traits(sel).representations)
    if feats.get("ifd", "auto") == "auto":
        feats["ifd"] = "ifd" in needs
    if any("_tok_" in c for c in needs):
        feats["stats"] = True
    if passes and feats.get("representations", "auto") in (None, "auto"):
        feats["representations"] = list(dict.fromkeys(passes))


def prepare_base(cfg: Any, s: VerdictSettings) -> tuple[dict, list[dict], dict, dict]:
    """``(base config, compared selector nodes, reference node, info)`` for a composed config.

    Raises:
        ConfigError: the pipeline's own validation, or a verdict-specific problem.
    """
    from omegaconf import DictConfig, OmegaConf, open_dict

    from grads.config import validate_config

    if isinstance(cfg, DictConfig):
        with open_dict(cfg):  # the pipeline's config: conf/verdict.yaml less its own block
            cfg.pop("verdict", None)
    else:
        cfg = {k: v for k, v in cfg.items() if k != "verdict"}
    cfg = validate_config(cfg)  # unknown keys, bad values: now; paths made absolute
    base = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    base = copy.deepcopy(base)
    composed = base["selector"]
    nodes = [selector_node(n, composed) for n in (s.selectors or (composed["name"],))]
    ref = selector_node(s.against, composed)
    if base.get("domain", {}).get("generator"):
        from grads.data.pool import materialise_generated

        materialise_generated(base["domain"], base)
    info = {"heldout": ensure_heldout(base, s), "eval": {"mode": s.eval}}
    if s.eval == "lean":
        lean_eval(base)
    info["eval"] |= {"suite": base["eval"].get("name"), **check_eval(base)}
    share_features(base, [*nodes, ref])
    base["export"] = {**(base.get("export") or {}), "enabled": False}
    # resolved at the run's seed: every job keeps this warm-up seed, whatever its own seed
    base["warmup"]["seed"] = int(base["warmup"].get("seed", base.get("seed", 0)) or 0)
    base["stages"] = list(ALL_STAGES)
    return base, nodes, ref, info


# --------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------
def count_budget(n: int) -> dict:
    """A budget of exactly ``n`` samples (``conf/budget/n100.yaml``'s shape)."""
    target = "grads.selectors.budget.Budget"
    return {"_target_": target, "kind": "count", "value": int(n), "name": f"n{int(n)}"}


def job_config(base: dict, node: dict, seed: int, budget: dict | None = None, reference=False):
    """``base`` with the selector ``node`` at ``seed`` (the reference: plain, unbalanced)."""
    cfg = copy.deepcopy(base)
    cfg["selector"], cfg["seed"] = copy.deepcopy(node), int(seed)
    if budget is not None:
        cfg["budget"] = copy.deepcopy(budget)
    if reference:  # the practitioner's question is "better than a plain random subset?"
        cfg["select"] = {**(cfg.get("select") or {}), "balance": None}
    return cfg


def make_job(base: dict, node: dict, seed: int, role: str, budget=None, size=None) -> Job:
    """A :class:`Job` named ``<label>[-<budget>]-s<seed>``."""
    from grads.selectors.balance import method_name

    cfg = job_config(base, node, seed, budget, reference=role == "reference")
    label = method_name(cfg)
    tag = f"-{budget['name']}" if budget is not None else ""
    return Job(f"{label}{tag}-s{seed}", label, role, int(seed), cfg, size)
