"""Target sets for the targeted baselines (LESS, RDS+): a small, named split per domain.

LESS and RDS+ select pool samples that resemble a handful of examples of the tasks one cares
about. Both papers take those examples from the evaluation tasks' few-shot / validation data, never
from their test items, and so does this module. A domain declares its target set in
``conf/domain/<name>.yaml``::

    target:
      name: medical_dev                 # the split's name, recorded with every selection
      limit_per_source: null            # optional cap on rows per source
      sources:                          # same schema as the pool's sources (grads.data.pool)
        - name: mmlu_anatomy            # also the row's group (LESS: one group per subtask)
          path: ${paths.data_dir}/general/mmlu/dev/anatomy_dev.csv
          prompt: "The following are ... {question}\\nA. {choice0}\\n...Answer:"
          response: "{answer}"
          map: {answer: {"0": A, "1": B, "2": C, "3": D}}
          key_field: question

or, for a generated domain, ``generator: {seed, n_entities}`` (see :func:`synthetic_dev`).

**Never test items.** :func:`load_target` refuses a source whose file is a test split (a ``test``
token in the file name, or ``reader_kwargs.split: test``) and drops, with a count, any row whose key
text equals an item of the evaluation files the domain lists under ``decontaminate`` (real case: five
MMLU clinical-knowledge dev questions reappear in the college-medicine test). Prompts follow each evaluation
task's own format (its ``description`` and ``doc_to_text``), answered with the gold choice.

Which evaluation tasks have a few-shot split is listed in ``grads/evaluation/tasks/README.md``;
tasks pinned to zero-shot (MedMCQA, BioASQ, the FinGPT sentiment tests) have none, so their domain's
target set covers the others only (see each domain file).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from grads.config_access import cfg_get
from grads.errors import UserError

log = logging.getLogger(__name__)


class TargetConfigError(UserError, ValueError):
    """A target set that is missing, malformed, or would use evaluation test items."""


def target_spec(cfg: Any) -> dict | None:
    """The domain's ``target`` node as a plain dict (``None`` when the domain declares none)."""
    dom = cfg_get(cfg, "domain") or {}
    spec = cfg_get(dom, "target")
    if not spec:
        return None
    if not hasattr(spec, "items"):
        raise TargetConfigError(f"domain.target must be a mapping, got {type(spec).__name__}")
    return dict(spec)


def spec_key(spec: dict | None) -> dict | None:
    """What of a target spec enters the cache key: everything but machine-specific path prefixes."""
    if spec is None:
        return None
    out = {k: v for k, v in spec.items() if k != "sources"}
    out["sources"] = [
        {k: v for k, v in dict(s).items() if k != "path"} | {"file": Path(str(s["path"])).name}
        if cfg_get(s, "path")
        else dict(s)
        for s in spec.get("sources") or []
    ]
    return out


def _is_test_file(source: Any) -> bool:
    stem = Path(str(cfg_get(source, "path", ""))).name.lower()
    tokens = set(re.split(r"[^a-z0-9]+", stem))
    split = str((cfg_get(source, "reader_kwargs") or {}).get("split", "")).lower()
    return "test" in tokens or split == "test"


def synthetic_dev(seed: int, n_entities: int, exclude_seed: int, exclude_entities: int) -> list:
    """Records of a dev split for the synthetic domain: its evaluation questions, answered, about
    fictional countries generated from another seed and absent from the evaluated domain.

    The synthetic evaluation has no few-shot split, and its questions are about the training
    entities, so any of them would be a test item. A disjoint set of entities asked the same way
    gives target rows with the evaluation's format and none of its items.
    """
    from grads.data import synthetic
    from grads.data.records import Record, sample_id

    taken = synthetic.generate(exclude_seed, exclude_entities, 0)
    names = {row["entity"] for row in taken["train"]}
    evaluated = {row["question"] for row in taken["eval_mc"]}
    out = []
    for row in synthetic.generate(seed, n_entities, 0)["eval_mc"]:
        entity = row["id"].rsplit("-", 1)[0]
        if entity in names or row["question"] in evaluated:
            continue
        q = row["question"].strip()
        prompt = f"Question: {q}\nAnswer:" if q.endswith("?") else q
        response = str(row["choices"][row["answer"]])
        out.append(
            Record(sample_id(prompt, response), "synthetic_dev", prompt, response, meta={"row": 0})
        )
    return out


def load_target(cfg: Any) -> tuple[list, dict]:
    """The domain's target records (``Record.source`` is the row's group) and a summary.

    Raises:
        TargetConfigError: no ``domain.target``; a source that is a test split; a row equal to an
            evaluation item; an empty result.
    """
    from grads.data.records import eval_file_texts, matches_eval, records_from_source

    spec = target_spec(cfg)
    dom = cfg_get(cfg, "domain") or {}
    if spec is None:
        raise TargetConfigError(
            f"domain '{cfg_get(dom, 'name')}' declares no target set (domain.target), which targeted "
            "selectors (less, rds) need; see grads.data.targets and conf/domain/medical.yaml"
        )
    name = str(cfg_get(spec, "name", "target"))
    gen = cfg_get(spec, "generator")
    n_leak = 0
    if gen:
        dgen = cfg_get(dom, "generator") or {}
        records = synthetic_dev(
            int(cfg_get(gen, "seed", 1000)),
            int(cfg_get(gen, "n_entities", 8)),
            int(cfg_get(dgen, "seed", 0)),
            int(cfg_get(dgen, "n_entities", 40)),
        )
    else:
        records = []
        cap = cfg_get(spec, "limit_per_source")
        on_bad = cfg_get(cfg_get(cfg, "data") or {}, "on_bad_row", "error")
        for source in cfg_get(spec, "sources") or []:
            if _is_test_file(source):
                raise TargetConfigError(
                    f"target '{name}', source '{cfg_get(source, 'name')}': {cfg_get(source, 'path')} is "
                    "a test split; target sets take few-shot / dev data only"
                )
            recs = records_from_source(source, on_bad_row=on_bad)
            limit = cfg_get(source, "limit", cap)
            records += recs[: int(limit)] if limit is not None else recs
        eval_texts: set[str] = set()
        for ev in cfg_get(dom, "decontaminate") or []:
            if not cfg_get(ev, "heldout_source"):
                eval_texts |= eval_file_texts(ev)
        leaked = [r for r in records if eval_texts and matches_eval(r, eval_texts)]
        if leaked:
            # Real case: 5 MMLU clinical_knowledge dev questions reappear in college_medicine test.
            log.warning(
                "target %s: dropped %d row(s) equal to evaluation items (e.g. %s row %s)",
                name,
                len(leaked),
                leaked[0].source,
                leaked[0].meta.get("row"),
            )
            drop, n_leak = {id(r) for r in leaked}, len(leaked)
            records = [r for r in records if id(r) not in drop]
    if not records:
        raise TargetConfigError(f"target '{name}' has no rows")
    groups = Counter(r.source for r in records)
    summary = {
        "name": name,
        "n": len(records),
        "groups": dict(groups),
        "dropped_eval_overlap": n_leak,
    }
    log.info("target %s: %d rows in %d groups", name, len(records), len(groups))
    return records, summary


def tokenized_target(cfg: Any, tokenizer) -> tuple[list[dict], dict]:
    """The target records tokenised like the pool (chat template, prompt masked)."""
    from grads.data.pool import tokenize_records

    records, summary = load_target(cfg)
    samples, stats = tokenize_records(records, tokenizer, cfg_get(cfg, "data"))
    if not samples:
        raise TargetConfigError(f"target '{summary['name']}': no row has a response token left")
    summary.update(n_tokenized=len(samples), dropped=stats["dropped_no_response"])
    return samples, summary
