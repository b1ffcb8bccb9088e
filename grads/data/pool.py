"""A domain's train pool: its sources' records (:mod:`grads.data.records`), then chat
messages, tokenised with the prompt masked.

A domain config (``conf/domain/*.yaml``) lists ``sources``; each source names a file (or hub id), a
``reader`` for its layout, and ``prompt``/``response`` templates over the record's fields. The
pipeline is::

    read rows -> validate fields -> render prompt/response -> decontaminate against eval sets
      -> de-duplicate -> pool_limit (deterministic) -> chat template + tokenise -> mask prompt

Every sample gets a stable id (a hash of its prompt and response), so selections compare across runs.
Bad input never raises a bare ``KeyError`` or ``UnicodeDecodeError`` and is never dropped silently:
with ``data.on_bad_row=error`` (default) the first bad row raises :class:`~grads.data.readers.BadRecordError` naming
file, row and field (for bytes that are not UTF-8 also the byte, its offset in the file and its
line); with ``skip`` every kind of bad row (invalid JSON, bytes that are not UTF-8, a CSV row with
the wrong number of values, a missing, empty or mistyped field, an unmappable label) is skipped and
counted per source and kind (``<source>:bad_row:<kind>``), and the first few are logged with file
and row; the counts travel with the features stage into the run's ``metrics.json`` (``data``).
Problems that would make every row bad (an empty file, a source whose rows all fail, an empty pool)
are errors in either mode.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from grads.config_access import cfg_get
from grads.constants import IGNORE_INDEX
from grads.data.records import Record, decontaminate, records_from_source

log = logging.getLogger(__name__)

# Keys of a domain node and of its list items that the code below reads (grads.config rejects
# others, so a typo such as `promt:` fails before the warm-up instead of rendering "None").
DOMAIN_KEYS = (
    "name",
    "sources",
    "generator",
    "pool_limit",
    "pool_seed",
    "decontaminate",
    "eval_tasks",
    "eval_tasks_general",
    "eval_tasks_hub",
    "hub_datasets",
)


# --------------------------------------------------------------------------------------------------
# Records: validated, rendered prompt/response pairs
# --------------------------------------------------------------------------------------------------


def _data_settings(data_cfg: Any) -> dict:
    """``data_cfg`` over the ``data`` defaults of conf/config.yaml (the one place they live)."""
    from grads.config_access import defaults

    given = {k: v for k, v in dict(data_cfg or {}).items() if v is not None}
    return {**defaults("data"), **given}


def _require_records(records: list, domain: Any, step: str, counts: Counter) -> None:
    """An empty pool is an error that says which step emptied it, with the counts so far."""
    if not records:
        raise ValueError(
            f"domain '{cfg_get(domain, 'name')}': the train pool is empty after {step} "
            f"(counts: {dict(sorted(counts.items()))})"
        )


def load_records(domain: Any, data_cfg: Any = None) -> tuple[list[Record], dict]:
    """All records of a domain's train pool after validation, decontamination, dedup and pool_limit.

    Returns:
        ``(records, stats)`` where stats counts rows read, skipped (per source and kind), filtered,
        duplicates, eval overlaps, etc.

    Raises:
        ValueError: the pool is empty after any step (the message names the step and the counts).
    """
    data = _data_settings(data_cfg)
    counts: Counter = Counter()
    records: list[Record] = []
    for source in cfg_get(domain, "sources") or []:
        if cfg_get(source, "enabled", True) is False:
            continue
        build = records_from_source
        if cfg_get(source, "builder"):  # a source with its own reader, e.g. the custom domain's
            from hydra.utils import get_method

            build = get_method(str(cfg_get(source, "builder")))
        recs = build(
            source, on_bad_row=data["on_bad_row"], system=data["system_prompt"], counts=counts
        )
        counts[f"{cfg_get(source, 'name')}:read"] += len(recs)
        records += recs
    _require_records(records, domain, "reading and filtering its sources", counts)
    records = decontaminate(records, domain, counts)
    _require_records(records, domain, "decontamination against its evaluation sets", counts)
    if data["dedup"]:
        seen, unique = set(), []
        for rec in records:
            if rec.id in seen:
                counts["duplicates_removed"] += 1
                continue
            seen.add(rec.id)
            unique.append(rec)
        records = unique
    from grads.data.heldout import exclude_heldout  # the held-out split never enters any pool

    records = exclude_heldout(records, domain, counts)
    limit = cfg_get(domain, "pool_limit")
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise ValueError(f"domain.pool_limit={limit!r}: expected an integer >= 1 or null")
    if limit is not None and int(limit) < len(records):
        # Deterministic subsample: order by a hash of (id, pool_seed), independent of file order.
        seed = str(cfg_get(domain, "pool_seed", 0))
        records = sorted(records, key=lambda r: hashlib.sha1((r.id + seed).encode()).digest())
        records = records[: int(limit)]
        counts["pool_limited_to"] = int(limit)
    for key, value in sorted(counts.items()):
        if "bad_row" in key or "duplicates" in key or "overlap" in key:
            log.warning("data: %s = %d", key, value)
        else:
            log.info("data: %s = %d", key, value)
    return records, dict(counts)


# --------------------------------------------------------------------------------------------------
# Tokenisation with prompt masking
# --------------------------------------------------------------------------------------------------
def messages_of(rec: Record) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": rec.system}] if rec.system else []
    if rec.meta.get("messages"):  # multi-turn (grads.data.custom_pool): the last turn is supervised
        return msgs + [dict(t) for t in rec.meta["messages"]]
    return msgs + [
        {"role": "user", "content": rec.prompt},
        {"role": "assistant", "content": rec.response},
    ]


def tokenize_record(rec: Record, tokenizer, max_seq_len: int, min_prompt_tokens: int = 8) -> dict:
    """Chat-format one record and return ``input_ids``/``labels`` with the prompt masked.

    The prompt (everything up to and including the assistant header) and the response are tokenised
    separately so the mask boundary is exact. When the total exceeds ``max_seq_len`` the prompt is
    cut first, from its middle (its start and the assistant header survive); the response is cut
    only if it alone does not fit.
    """
    msgs = messages_of(rec)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    prompt_text = tokenizer.apply_chat_template(
        msgs[:-1], tokenize=False, add_generation_prompt=True
    )
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the conversation"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    n_prompt_orig = len(prompt_ids)
    room = max_seq_len - len(response_ids)
    if room < min(min_prompt_tokens, len(prompt_ids)):
        keep = min(min_prompt_tokens, len(prompt_ids))
        response_ids = response_ids[: max(0, max_seq_len - keep)]
        room = keep
    if len(prompt_ids) > room:
        tail = min(len(prompt_ids), max(room * 2 // 5, min(room, 8)))
        prompt_ids = prompt_ids[: room - tail] + prompt_ids[len(prompt_ids) - tail :]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    answer_only = tokenizer(rec.response, add_special_tokens=False)["input_ids"][:max_seq_len]
    return {
        "id": rec.id,
        "source": rec.source,
        "input_ids": input_ids,
        "labels": labels,
        "n_prompt": len(prompt_ids),
        "n_response": len(response_ids),
        "prompt_truncated": len(prompt_ids) < n_prompt_orig,
        "response_ids": answer_only,
    }


def tokenize_records(
    records: list[Record], tokenizer, data_cfg: Any = None
) -> tuple[list[dict], dict]:
    """Tokenise records; samples left with fewer than ``min_response_tokens`` are reported and dropped."""
    data = _data_settings(data_cfg)
    max_len, min_resp = int(data["max_seq_len"]), int(data["min_response_tokens"])
    samples, dropped, truncated = [], [], 0
    from tqdm.auto import tqdm

    for rec in tqdm(records, desc="tokenise", disable=len(records) < 2000, mininterval=2):
        s = tokenize_record(rec, tokenizer, max_len)
        truncated += s["prompt_truncated"]
        if s["n_response"] < min_resp:
            dropped.append(rec.id)
            continue
        samples.append(s)
    if dropped:
        log.warning(
            "data: %d samples have no response token left after truncation to %d tokens "
            "and were dropped (first ids: %s)",
            len(dropped),
            max_len,
            dropped[:5],
        )
    stats = {
        "n_samples": len(samples),
        "dropped_no_response": len(dropped),
        "prompt_truncated": truncated,
        "max_seq_len": max_len,
    }
    return samples, stats


def load_pool(cfg: Any, tokenizer, return_stats: bool = False):
    """The tokenised train pool of ``cfg.domain`` as a ``datasets.Dataset``.

    Columns: ``id`` (stable content hash), ``source``, ``input_ids``, ``labels`` (-100 on the prompt),
    ``n_prompt``, ``n_response``, ``prompt_truncated``, ``response_ids`` (the response tokenised
    alone, for IFD).
    """
    from datasets import Dataset

    domain, data_cfg = cfg_get(cfg, "domain"), cfg_get(cfg, "data")
    if cfg_get(domain, "generator"):
        materialise_generated(domain, cfg)
    records, stats = load_records(domain, data_cfg)
    samples, tok_stats = tokenize_records(records, tokenizer, data_cfg)
    stats.update(tok_stats)
    counts = Counter({k: v for k, v in stats.items() if isinstance(v, int)})
    _require_records(samples, domain, f"tokenising to data.max_seq_len={tok_stats['max_seq_len']}"
                     " (every response was cut away)", counts)  # fmt: skip
    ds = Dataset.from_list(samples)
    return (ds, stats) if return_stats else ds


def materialise_generated(domain: Any, cfg: Any) -> None:
    """Write a generated domain's files (e.g. ``synthetic``) if its sources are missing."""
    from grads.data import synthetic

    gen = cfg_get(domain, "generator")
    out_dir = Path(str(cfg_get(gen, "out_dir")))
    synthetic.materialise(out_dir, **{k: v for k, v in dict(gen).items() if k != "out_dir"})


def collate(
    samples: list[dict],
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict:
    """Pad a list of samples (``input_ids``, ``labels``) into tensors.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding), ``[B, T]``.
    A sample without ``labels`` is supervised on all its tokens.
    """
    import torch

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}")
    T = max(len(s["input_ids"]) for s in samples)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        input_ids[i, sl] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        # No labels: language modelling on the whole sequence (e.g. the answer-only pass of IFD).
        labels[i, sl] = torch.as_tensor(s.get("labels", s["input_ids"]), dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pool_summary(pool) -> dict:
    """Size and token-length distribution of a tokenised pool (for the demo and the notes)."""
    import numpy as np

    lengths = np.asarray([len(x) for x in pool["input_ids"]])
    resp = np.asarray(pool["n_response"])

    def q(a):
        pct = {f"p{p}": int(np.percentile(a, p)) for p in (5, 25, 50, 75, 95)}
        return pct | {"mean": round(float(a.mean()), 1), "max": int(a.max())}

    return {
        "n": len(lengths),
        "tokens_total": int(lengths.sum()),
        "length": q(lengths),
        "response_tokens": q(resp),
        "sources": dict(Counter(pool["source"])),
    }
