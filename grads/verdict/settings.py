"""The ``verdict`` block of ``grads-verdict``'s config (``conf/verdict.yaml``), checked first.

``conf/verdict.yaml`` is the pipeline's primary config (``conf/config.yaml``, every group and
override) plus this block, so ``grads`` and its cache keys never see it. Every problem is reported at
once as a :class:`grads.config.ConfigError` naming the key and what is allowed, like the pipeline's
own validation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from grads.config import ConfigError
from grads.config_access import as_dict
from grads.constants import conf_dir

EVAL_MODES = ("lean", "suite")
EXPORT_MODES = ("winner", "none")
RATE_STAGES = ("warmup", "features", "finetune", "evaluate")
# Selectors that pick no subset a random one could be compared with.
NOT_A_SUBSET = ("full",)
# Default size of the held-out split a pool without one gets: min(HELDOUT_MAX, HELDOUT_FRACTION * n).
HELDOUT_MAX, HELDOUT_FRACTION = 300, 0.10


@dataclasses.dataclass(frozen=True)
class VerdictSettings:
    """The checked ``verdict`` block.

    Attributes:
        selectors: selector options to judge; empty: the composed ``selector``.
        against: the reference selector option (``random``).
        seeds: seeds per selector, counted from the run's ``seed``.
        heldout: size of the held-out split set aside when the domain has none (None: the default
            ``min(300, 10 % of the pool)``).
        eval: ``lean`` (held-out bpb and KL only) or ``suite`` (the composed eval as it is).
        export: ``winner`` or ``none``.
        n_boot: bootstrap resamples.
        tok_s: default tokens per second of each stage for the cost estimate.
        dry_run: print the jobs and the cost estimate, run nothing.
    """

    selectors: tuple[str, ...]
    against: str
    seeds: int
    heldout: int | None
    eval: str
    export: str
    n_boot: int
    tok_s: dict[str, float]
    dry_run: bool = False

    def seed_list(self, base_seed: int) -> list[int]:
        """The seeds every selector runs: ``base_seed .. base_seed + seeds - 1``."""
        return [int(base_seed) + i for i in range(self.seeds)]


def defaults() -> dict:
    """The ``verdict`` block of ``conf/verdict.yaml`` (the one place its defaults live)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(conf_dir()) / "verdict.yaml")
    return dict(OmegaConf.to_container(node.verdict, resolve=False))  # type: ignore[arg-type]


def selector_options() -> list[str]:
    """The selector options of the config folder (``conf/selector/*.yaml``)."""
    return sorted(p.stem for p in (Path(conf_dir()) / "selector").glob("*.yaml"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_names(block: dict, composed: str | None) -> list[str]:
    options = selector_options()
    problems = []
    sels = block.get("selectors")
    if sels is not None and not (isinstance(sels, list) and all(isinstance(s, str) for s in sels)):
        problems.append(f"verdict.selectors={sels!r}: expected null or a list of selector names")
        sels = []
    for name in sels or []:
        if name not in options and name != composed:
            problems.append(f"verdict.selectors: unknown selector {name!r}; allowed: {options}")
        if name in NOT_A_SUBSET:
            problems.append(
                f"verdict.selectors: {name!r} keeps the whole pool; a random subset of that size "
                "is the same pool"
            )
    against = block.get("against")
    if not isinstance(against, str) or against not in options:
        problems.append(
            f"verdict.against={against!r}: expected a selector name; allowed: {options}"
        )
    elif against in (sels or [composed]):
        problems.append(
            f"verdict.against={against!r} is also compared: list other selectors in "
            "verdict.selectors (e.g. verdict.selectors=[grads])"
        )
    return problems


def _check_values(block: dict) -> list[str]:
    problems = []
    if not _is_int(block.get("seeds")) or block["seeds"] < 1:
        problems.append(f"verdict.seeds={block.get('seeds')!r}: expected an integer >= 1")
    held = block.get("heldout")
    if held is not None and (not _is_int(held) or held < 1):
        problems.append(f"verdict.heldout={held!r}: expected null or an integer >= 1")
    for key, allowed in (("eval", EVAL_MODES), ("export", EXPORT_MODES)):
        if block.get(key) not in allowed:
            problems.append(f"verdict.{key}={block.get(key)!r}: expected one of {list(allowed)}")
    if not isinstance(block.get("dry_run"), bool):
        problems.append(f"verdict.dry_run={block.get('dry_run')!r}: expected true or false")
    if not _is_int(block.get("n_boot")) or block["n_boot"] < 100:
        problems.append(f"verdict.n_boot={block.get('n_boot')!r}: expected an integer >= 100")
    rates = block.get("tok_s")
    if not isinstance(rates, dict):
        return problems + [f"verdict.tok_s={rates!r}: expected a mapping of {list(RATE_STAGES)}"]
    for stage, value in rates.items():
        if stage not in RATE_STAGES:
            problems.append(f"verdict.tok_s.{stage}: unknown stage; allowed: {list(RATE_STAGES)}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            problems.append(f"verdict.tok_s.{stage}={value!r}: expected a number > 0")
    return problems


def verdict_settings(cfg: Any) -> VerdictSettings:
    """The ``verdict`` block of ``cfg`` over its ``conf/verdict.yaml`` defaults, checked.

    Raises:
        ConfigError: unknown keys or bad values, each named (nothing has run yet).
    """
    cfg = as_dict(cfg)
    base = defaults()
    given = dict(cfg.get("verdict") or {})
    problems = [
        f"verdict.{k}: unknown key; allowed: {sorted(base)}" for k in given if k not in base
    ]
    block = {**base, **given}
    block["tok_s"] = {**dict(base.get("tok_s") or {}), **dict(given.get("tok_s") or {})}
    composed = (cfg.get("selector") or {}).get("name")
    problems += _check_names(block, composed) + _check_values(block)
    if problems:
        raise ConfigError(problems)
    return VerdictSettings(
        selectors=tuple(block["selectors"] or ()),
        against=block["against"],
        seeds=int(block["seeds"]),
        heldout=block["heldout"],
        eval=block["eval"],
        export=block["export"],
        n_boot=int(block["n_boot"]),
        tok_s={k: float(v) for k, v in block["tok_s"].items()},
        dry_run=block["dry_run"],
    )
