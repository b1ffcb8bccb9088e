"""Held-out split of a domain's own SFT distribution: never in any pool, scored as domain loss.

A domain config may carry ``heldout: {n, salt}``. After the pool's records are read, decontaminated
and de-duplicated (``grads.data.pool.load_records``), the held-out split is chosen *by content*:

1. records are grouped by their normalised key text (the source's ``key_field``, else the prompt),
   so every copy of a question lands on one side;
2. key groups are ordered by ``sha1(salt + key)``;
3. groups are taken in that order until they hold ``n`` distinct samples (the last group is kept
   whole, so the split may exceed ``n`` by a few samples).

``load_records`` removes these records *before* ``pool_limit`` subsamples, so no pool the pipeline
can build (any ``pool_limit``, any ``pool_seed``, with or without ``data.dedup``) contains a
held-out key. The choice depends only on the candidate records' content and the salt.

Two optional keys size and place the split for pools of any size (the custom domain sets both):
``max_frac`` caps it at that fraction of the distinct candidate samples (at least one sample of a
pool of two or more), and ``only_when_measured: true`` keeps it only in runs that score it (the
evaluate stage runs with ``grads_heldout`` in ``eval.domain_loss_tasks``): :func:`grads.evaluation.settings.resolve_for_run`,
called by ``grads.config.validate_config``, then drops the block (``heldout: null``) from any
other run, e.g. ``grads-select``, so that every record stays a candidate there. A block that still
carries the flag (a config that skipped validation) sets nothing aside.

The synthetic domain has ``heldout: {n, from_generated: eval_mc}`` instead: its held-out samples are
the generator's evaluation phrasings (question -> correct answer), which no train phrasing uses.

The evaluate stage scores the split with the ``grads_heldout`` lm-eval task: :func:`materialise`
writes it to ``<cache_dir>/heldout/<domain>-<hash>.jsonl`` and the runner passes that path to the
task loader as ``metadata["heldout_path"]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from grads.config_access import cfg_get
from grads.data.records import Record, candidate_records, id_key, normalise_text, sample_id
from grads.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_SALT = "grads-heldout-v1"
HELDOUT_VERSION = 1


class HeldoutConfigError(UserError, ValueError):
    """A domain's ``heldout`` block is malformed (the message names the key)."""


def heldout_config(domain: Any) -> dict | None:
    """The validated ``domain.heldout`` block, or None when the domain has none.

    Raises:
        HeldoutConfigError: ``n`` is not a positive integer, or ``from_generated`` is unknown.
    """
    spec = cfg_get(domain, "heldout")
    if not spec:
        return None
    spec = dict(spec)
    name = cfg_get(domain, "name", "?")
    n = spec.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise HeldoutConfigError(f"domain '{name}': heldout.n={n!r} must be a positive integer")
    gen = spec.get("from_generated")
    if gen is not None and gen != "eval_mc":
        raise HeldoutConfigError(
            f"domain '{name}': heldout.from_generated={gen!r}: only 'eval_mc' is supported"
        )
    frac = spec.get("max_frac")
    if frac is not None and (
        isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 < frac < 1
    ):
        raise HeldoutConfigError(
            f"domain '{name}': heldout.max_frac={frac!r} must be a fraction in (0, 1) or null"
        )
    flag = spec.get("only_when_measured", False)
    if not isinstance(flag, bool):
        raise HeldoutConfigError(
            f"domain '{name}': heldout.only_when_measured={flag!r} must be true or false"
        )
    if flag:  # not resolved for a run (grads.config.validate_config does): nothing is set aside
        return None
    salt = str(spec.get("salt") or DEFAULT_SALT)
    return {"n": n, "salt": salt, "from_generated": gen, "max_frac": frac}


def target_size(spec: dict, n_candidates: int) -> int:
    """Samples to set aside: ``n``, capped at ``max_frac`` of the candidates (at least 1 of 2+)."""
    n = int(spec["n"])
    if spec.get("max_frac") is not None:
        n = min(n, max(int(spec["max_frac"] * n_candidates), 1 if n_candidates >= 2 else 0))
    return n


def key_of(rec: Record) -> str:
    """The normalised text that decides a record's side (its key text, else its prompt)."""
    key = rec.meta.get("key_text")
    return normalise_text(key if key is not None else rec.prompt)


def _rank(salt: str, key: str) -> bytes:
    return hashlib.sha1(f"{salt}\x00{key}".encode()).digest()


def choose_keys(records: Iterable[Record], n: int, salt: str = DEFAULT_SALT) -> set[str]:
    """The held-out key texts: whole key groups in hash order until ``n`` distinct samples.

    Args:
        records: candidate records (after decontamination; duplicates are counted once).
        n: target number of held-out samples.
        salt: changes the draw.

    Returns:
        Normalised key texts (see :func:`key_of`).
    """
    groups, _ = first_groups(records, n, salt)
    return take_groups(groups, n)


def first_groups(
    records: Iterable[Record], k: int, salt: str = DEFAULT_SALT
) -> tuple[list[tuple[bytes, str, set[str]]], int]:
    """The ``k`` key groups first in hash order, with their distinct ids, in one pass over
    ``records`` holding at most ``k`` groups (every group holds a sample, so the first ``k`` groups
    hold any split of up to ``k`` samples); also the number of distinct ids among all records.

    Returns:
        ``([(rank, key, ids), ...] in hash order, n_distinct)``.
    """
    import heapq

    heap: list[tuple[bytes, str]] = []  # max-heap by rank (ranks negated bytewise)
    ids_by_key: dict[str, set[str]] = {}
    seen: set[int | str] = set()  # distinct ids (sample ids are 16 hex digits: kept as ints)
    for rec in records:
        seen.add(id_key(rec.id))
        key = key_of(rec)
        if key in ids_by_key:
            ids_by_key[key].add(rec.id)
            continue
        rank = _rank(salt, key)
        if len(heap) < k:
            heapq.heappush(heap, (_negate(rank), key))
        elif k and rank < _negate(heap[0][0]):
            _, dropped = heapq.heapreplace(heap, (_negate(rank), key))
            del ids_by_key[dropped]
        else:
            continue
        ids_by_key[key] = {rec.id}
    groups = sorted((_negate(r), key, ids_by_key[key]) for r, key in heap)
    return groups, len(seen)


def take_groups(groups: list[tuple[bytes, str, set[str]]], n: int) -> set[str]:
    """Keys of ``groups`` (in hash order) until they hold ``n`` distinct samples."""
    chosen: set[str] = set()
    total = 0
    for _, key, ids in groups:
        if total >= n:
            break
        chosen.add(key)
        total += len(ids)
    return chosen


def _negate(rank: bytes) -> bytes:
    return bytes(255 - b for b in rank)


def split(records: list[Record], domain: Any) -> tuple[list[Record], list[Record]]:
    """``(pool records, held-out records)`` of candidate records; held-out de-duplicated by id.

    A domain without a ``heldout`` block (or a generated one, whose held-out samples are not pool
    records) keeps every record in the pool.
    """
    spec = heldout_config(domain)
    if spec is None or spec["from_generated"]:
        return list(records), []
    n = target_size(spec, len({r.id for r in records}))
    if n < 1:
        return list(records), []
    keys = choose_keys(records, n, spec["salt"])
    pool, held, seen = [], [], set()
    for rec in records:
        if key_of(rec) in keys:
            if rec.id not in seen:
                seen.add(rec.id)
                held.append(rec)
        else:
            pool.append(rec)
    return pool, held


def candidates(domain: Any, data_cfg: Any = None) -> list[Record]:
    """A domain's records after validation, decontamination and de-duplication (no pool_limit).

    The same steps, in the same order, as ``grads.data.pool.iter_pool_records`` up to its held-out
    step.
    """
    on_bad_row = cfg_get(data_cfg, "on_bad_row", "error")
    system = cfg_get(data_cfg, "system_prompt")
    return list(candidate_records(domain, on_bad_row, system, Counter()))


def excluded_keys(domain: Any, on_bad_row: str, system: str | None) -> set[str] | None:
    """The held-out split's key texts of a domain's pool (``None``: it sets nothing aside), chosen
    in one pass over the candidate records that holds at most ``heldout.n`` key groups."""
    spec = heldout_config(domain)
    if spec is None or spec["from_generated"]:
        return None
    stream = candidate_records(domain, on_bad_row, system, Counter(), dedup=False)
    groups, n_distinct = first_groups(stream, int(spec["n"]), spec["salt"])
    n = target_size(spec, n_distinct)
    return take_groups(groups, n) if n >= 1 else None


def _generated(domain: Any, cfg: Any) -> list[Record]:
    """The synthetic domain's held-out phrasings: ``eval_mc`` question -> its correct choice."""
    from grads.data import synthetic

    gen = dict(cfg_get(domain, "generator") or {})
    out_dir = gen.pop("out_dir", None)
    if out_dir is None:
        cache = cfg_get(cfg_get(cfg, "paths"), "cache_dir", "outputs/cache")
        out_dir = Path(str(cache)) / "synthetic" / f"seed{int(gen.get('seed', 0))}"
    paths = synthetic.materialise(out_dir, **gen)
    out = []
    with open(paths["eval_mc"], encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            prompt, response = row["question"], str(row["choices"][row["answer"]])
            out.append(
                Record(sample_id(prompt, response), "synthetic_heldout", prompt, response, None)
            )
    return out


def heldout_records(cfg: Any) -> list[Record]:
    """The held-out records of ``cfg.domain`` (capped at ``n`` for generated domains).

    Raises:
        HeldoutConfigError: the domain has no ``heldout`` block.
    """
    domain = cfg_get(cfg, "domain")
    spec = heldout_config(domain)
    if spec is None and cfg_get(cfg_get(domain, "heldout"), "only_when_measured"):
        raise HeldoutConfigError(
            f"domain '{cfg_get(domain, 'name', '?')}': heldout.only_when_measured is not resolved "
            "for this run (grads.config.validate_config does it)"
        )
    if spec is None:
        raise HeldoutConfigError(
            f"domain '{cfg_get(domain, 'name', '?')}' has no `heldout` block: add "
            "`heldout: {n: 300}` to its conf/domain file (needed by the grads_heldout task)"
        )
    if spec["from_generated"]:
        recs = _generated(domain, cfg)
        return sorted(recs, key=lambda r: _rank(spec["salt"], key_of(r)))[: spec["n"]]
    _, held = split(candidates(domain, cfg_get(cfg, "data")), domain)
    return sorted(held, key=lambda r: (_rank(spec["salt"], key_of(r)), r.id))


def _source_identity(domain: Any) -> list:
    """What the held-out split depends on besides the config text: each input file's size/mtime."""
    files = [cfg_get(s, "path") for s in cfg_get(domain, "sources") or []]
    files += [cfg_get(d, "path") for d in cfg_get(domain, "decontaminate") or []]
    out = []
    for f in files:
        p = Path(str(f)) if f else None
        out.append([p.name, p.stat().st_size, int(p.stat().st_mtime)] if p and p.exists() else f)
    return out


def materialise(cfg: Any) -> Path:
    """Write the held-out split as JSON Lines (``{id, source, prompt, response}``); return its path.

    The file name hashes the domain's pool definition, the held-out block, the bad-row policy and
    the input files' sizes, so a changed domain gets a new file and old ones are never reused.
    """
    from omegaconf import OmegaConf

    from grads.io import write_jsonl

    domain = cfg_get(cfg, "domain")
    plain = OmegaConf.to_container(domain, resolve=True) if OmegaConf.is_config(domain) else domain
    ident = {
        "version": HELDOUT_VERSION,
        "domain": {k: v for k, v in dict(plain).items() if k not in ("eval_tasks", "hub_datasets")},
        "on_bad_row": cfg_get(cfg_get(cfg, "data"), "on_bad_row", "error"),
        # generated domains are defined by their generator parameters (files may not exist yet)
        "files": []
        if heldout_config(domain) and cfg_get(cfg_get(domain, "heldout"), "from_generated")
        else _source_identity(domain),
    }
    ident["domain"].pop("pool_limit", None)
    ident["domain"].pop("pool_seed", None)
    blob = json.dumps(ident, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:16]
    cache = Path(str(cfg_get(cfg_get(cfg, "paths"), "cache_dir", "outputs/cache")))
    path = cache / "heldout" / f"{cfg_get(domain, 'name', 'domain')}-{digest}.jsonl"
    if not path.exists():
        recs = heldout_records(cfg)
        write_jsonl(
            path,
            [
                {"id": r.id, "source": r.source, "prompt": r.prompt, "response": r.response}
                for r in recs
            ],
        )
        log.info("held-out split: %d samples -> %s", len(recs), path)
    return path
