"""A job's stage keys: each stage's key hashes its declared identity (its
:class:`~grads.identity.StageSpec`, beside the stage in :mod:`grads.stages`) chained with the keys
of the stages it reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from grads.constants import STAGES
from grads.hashing import Fingerprints, digest, fingerprints_of
from grads.stages import SPECS


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
    fp = fingerprints or fingerprints_of(cfg)
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


def stage_keys(cfg: Mapping, fingerprints: Fingerprints | None = None) -> dict[str, str]:
    """Keys of every stage for a resolved config (see :mod:`grads.identity`)."""
    return {s: i.key for s, i in stage_identities(cfg, STAGES, fingerprints).items()}
