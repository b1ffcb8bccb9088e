"""The paper's grid and how its runs are named, read from ``conf/experiment/``.

* Table 1 is ``experiment=paper_main``: its ``hydra.sweeper.params`` give the domains and the
  selectors (in the order the phases run them: ``random`` and ``grads`` first, so the comparison that
  matters arrives early, ``full`` last); the baselines are the selectors that are neither GrADS
  (``grads*``) nor ``random`` / ``full``.
* Table 2 is ``experiment=paper_ablation``: the ``grads`` selector's rules crossed with the gradient
  sources, each run named ``grads.<rule>.<source>`` (``selector.name`` in that file), e.g.
  ``grads.density_x_magnitude.embed+lm_head``, the ``grads`` selector's default
  (``conf/selector/grads.yaml``, :func:`default_grads_run`).
* The cheaper selection variants (``grads_w5``, ``grads_rec``) are GrADS with another warm-up or
  feature source, run by :mod:`grads.paper.phases` and named by ``selector.name``.
"""

from __future__ import annotations

import functools
from pathlib import Path

ABLATION_PREFIX = "grads."  # conf/experiment/paper_ablation.yaml names runs grads.<rule>.<source>
ABLATION_BUDGET = "p5"
HEADLINE = "domain_bpb"  # the headline domain metric (RESULTS.md, "Noise floor"); lower is better
GRADS_VARIANTS = ("grads_paper", "grads_cover")  # GrADS selectors outside the rule x source grid
BEST_OTHER = " (best other rule)"  # suffix of Table 1's row for the best non-default ablation run
# selector name -> what differs from the paper's selection (a separate sweep each). Their features
# are GrADS's alone (no IFD / LESS / RDS+ passes), so their selection cost is what a user pays.
_GRADS_ONLY = ["features.ifd=false", "features.representations=[]"]
CHEAP = {
    "grads_w5": ["warmup.fraction=0.05", *_GRADS_ONLY],
    "grads_rec": ["features.source=warmup", *_GRADS_ONLY],
}
CHEAP_VARIANTS = tuple(CHEAP)


def _experiment_dir() -> Path:
    from grads.constants import conf_dir

    return Path(conf_dir()) / "experiment"


def sweep_params(experiment: str) -> dict[str, list]:
    """``hydra.sweeper.params`` of ``conf/experiment/<experiment>.yaml``, each axis as its list of
    values (parsed as Hydra parses a sweep: ``[embed],[lm_head]`` is two lists)."""
    return _sweep_params(str(_experiment_dir() / f"{experiment}.yaml"))


@functools.lru_cache(maxsize=8)
def _sweep_params(path: str) -> dict[str, list]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.load(path).hydra.sweeper.params)
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        out[key] = list(override.sweep_iterator()) if override.is_sweep_override() else [value]
    return out


def domains() -> list[str]:
    """The real domains of the paper's tables (``paper_main``'s ``domain`` axis)."""
    return [str(d) for d in sweep_params("paper_main")["domain"]]


def main_selectors() -> list[str]:
    """Table 1's selectors, in the order the phases run them (``paper_main``'s ``selector`` axis)."""
    return [str(s) for s in sweep_params("paper_main")["selector"]]


def baselines() -> list[str]:
    """Table 1's baselines: the selectors that are neither GrADS nor ``random`` / ``full``."""
    return [
        s for s in main_selectors() if s not in ("random", "full") and not s.startswith("grads")
    ]


def rules() -> list[str]:
    """Table 2's rows: the ``grads`` rules that ``paper_ablation`` sweeps."""
    return [str(r) for r in sweep_params("paper_ablation")["selector.rule"]]


def ablation_sources() -> dict[str, str]:
    """Table 2's columns as sweeps: phase name -> gradient source (``embed``, ``lm_head``,
    ``embed+lm_head``), one ``paper_ablation`` sweep per source (``ablation_both`` for both)."""
    out = {}
    for layers in sweep_params("paper_ablation")["selector.layers"]:
        layers = [str(x) for x in layers]
        out[f"ablation_{layers[0] if len(layers) == 1 else 'both'}"] = "+".join(layers)
    return out


def is_ablation(name: object) -> bool:
    """``grads.<rule>.<source>``: a Table 2 run (``experiment=paper_ablation``)."""
    name = str(name)
    return (
        name.startswith(ABLATION_PREFIX) and name.count(".") == 2 and not name.endswith(BEST_OTHER)
    )


def cell_name(rule: object, layers) -> str:
    """The Table 2 name of the ``grads`` rule ``rule`` on the gradient sources ``layers``."""
    return f"{ABLATION_PREFIX}{rule}.{'+'.join(map(str, layers))}"


def default_grads_run() -> str:
    """The ablation name of the ``grads`` selector's default (``conf/selector/grads.yaml``), e.g.
    ``grads.density_x_magnitude.embed+lm_head``: read from the config, so it follows a change of
    the default."""
    from grads.constants import conf_dir

    return _default_run(str(Path(conf_dir()) / "selector" / "grads.yaml"))


@functools.lru_cache(maxsize=4)
def _default_run(path: str) -> str:
    from omegaconf import OmegaConf

    sel = OmegaConf.load(path)
    return cell_name(sel.rule, sel.layers)


def grads_cell(config_file: Path, selector: object) -> str | None:
    """The Table 2 cell (``grads.<rule>.<source>``) a ``grads`` or ablation run selected with, read
    from its resolved config: it stays true when the ``grads`` default changes later."""
    if selector != "grads" and not is_ablation(selector):
        return None
    from omegaconf import OmegaConf

    sel = OmegaConf.load(config_file).get("selector") or {}
    if "rule" not in sel or "layers" not in sel:
        return None
    return cell_name(sel.rule, sel.layers)
