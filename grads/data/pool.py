"""A domain's train pool: its sources' records (:mod:`grads.data.records`), then chat
messages, tokenised with the prompt masked.

A domain config (``conf/domain/*.yaml``) lists ``sources``; each source names a file (or hub id), a
``reader`` for its layout, and ``prompt``/``response`` templates over the record's fields. The
pipeline is::

    read rows -> validate fields -> render prompt/response -> decontaminate against eval sets
      -> de-duplicate -> pool_limit (deterministic) -> chat template + tokenise -> mask prompt

The pool streams: records pass through these steps one at a time (:func:`iter_pool_records`) and
are tokenised a batch at a time into an Arrow file that the stages memory-map (:func:`load_pool`),
so what a pool costs in memory does not grow with its size (held: the ids de-duplication has seen,
one integer each; the held-out split's key groups; with ``pool_limit``, the kept records).

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
import heapq
import logging
import os
import shutil
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grads.config_access import cfg_get
from grads.constants import IGNORE_INDEX
from grads.data.records import Record, candidate_records, require_records
from grads.io import read_json, write_json

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


def load_records(domain: Any, data_cfg: Any = None) -> tuple[list[Record], dict]:
    """All records of a domain's train pool after validation, decontamination, dedup and pool_limit.

    Returns:
        ``(records, stats)`` where stats counts rows read, skipped (per source and kind), filtered,
        duplicates, eval overlaps, etc.

    Raises:
        ValueError: the pool is empty after any step (the message names the step and the counts).
    """
    counts: Counter = Counter()
    records = list(iter_pool_records(domain, data_cfg, counts))
    log_counts(counts)
    return records, dict(counts)


def iter_pool_records(domain: Any, data_cfg: Any, counts: Counter) -> Iterator[Record]:
    """The records of a domain's train pool in pool order, one at a time (see :func:`load_records`).

    Without ``pool_limit`` nothing but the de-duplication's ids and the held-out split's keys is
    held, whatever the pool's size (a domain with a held-out split is read twice: once to choose
    it, once to build the pool). ``pool_limit`` keeps the ``pool_limit`` records first in the order
    of ``sha1(id + pool_seed)``, in that order (independent of file order); a pool no larger than
    the limit keeps its order.
    """
    from grads.data.heldout import excluded_keys, key_of  # never in any pool

    data = _data_settings(data_cfg)
    limit = cfg_get(domain, "pool_limit")
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise ValueError(f"domain.pool_limit={limit!r}: expected an integer >= 1 or null")
    held = excluded_keys(domain, data["on_bad_row"], data["system_prompt"])
    stream = candidate_records(
        domain, data["on_bad_row"], data["system_prompt"], counts, dedup=bool(data["dedup"])
    )
    if held:
        stream = _without(stream, lambda rec: key_of(rec) in held, counts)
    if limit is None:
        yield from stream
        return
    seed = str(cfg_get(domain, "pool_seed", 0))
    n_seen = Counter()
    kept = heapq.nsmallest(
        int(limit),
        enumerate(_counted(stream, n_seen)),
        key=lambda item: hashlib.sha1((item[1].id + seed).encode()).digest(),
    )
    if int(limit) < n_seen["n"]:
        counts["pool_limited_to"] = int(limit)
    else:  # the whole pool fits: file order, as without a limit
        kept.sort(key=lambda item: item[0])
    yield from (rec for _, rec in kept)


def _without(stream: Iterable[Record], drop, counts: Counter) -> Iterator[Record]:
    for rec in stream:
        if drop(rec):
            counts["heldout_for_domain_loss"] += 1
            continue
        yield rec


def _counted(stream: Iterable[Record], seen: Counter) -> Iterator[Record]:
    for rec in stream:
        seen["n"] += 1
        yield rec


def log_counts(counts: Counter | dict) -> None:
    """The pool's counts in the log: warnings for what was dropped, info for the rest."""
    for key, value in sorted(counts.items()):
        if "bad_row" in key or "duplicates" in key or "overlap" in key:
            log.warning("data: %s = %d", key, value)
        else:
            log.info("data: %s = %d", key, value)


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
    return tokenize_batch([rec], tokenizer, max_seq_len, min_prompt_tokens)[0]


def tokenize_batch(
    records: list[Record], tokenizer, max_seq_len: int, min_prompt_tokens: int = 8
) -> list[dict]:
    """:func:`tokenize_record` of several records, with one tokenizer call for all their texts
    (the same token ids: a fast tokenizer encodes each text of a batch on its own)."""
    texts = []
    for rec in records:
        msgs = messages_of(rec)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(
            msgs[:-1], tokenize=False, add_generation_prompt=True
        )
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render the prompt as a prefix of the conversation"
            )
        texts.append((prompt, full[len(prompt) :]))
    n = len(records)
    batch = [p for p, _ in texts] + [r for _, r in texts] + [rec.response for rec in records]
    ids = tokenizer(batch, add_special_tokens=False)["input_ids"] if n else []
    return [
        _masked(rec, ids[i], ids[n + i], ids[2 * n + i], max_seq_len, min_prompt_tokens)
        for i, rec in enumerate(records)
    ]


def _masked(
    rec: Record,
    prompt_ids: list[int],
    response_ids: list[int],
    answer_ids: list[int],
    max_seq_len: int,
    min_prompt_tokens: int,
) -> dict:
    """One sample from its prompt's and response's token ids: truncated to ``max_seq_len``
    (:func:`tokenize_record`), the prompt masked."""
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
    return {
        "id": rec.id,
        "source": rec.source,
        "input_ids": input_ids,
        "labels": labels,
        "n_prompt": len(prompt_ids),
        "n_response": len(response_ids),
        "prompt_truncated": len(prompt_ids) < n_prompt_orig,
        "response_ids": answer_ids[:max_seq_len],
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


def load_pool(
    cfg: Any,
    tokenizer,
    return_stats: bool = False,
    keep_in: str | os.PathLike | None = None,
    reuse_from: str | os.PathLike | None = None,
):
    """The tokenised train pool of ``cfg.domain`` as a memory-mapped ``datasets.Dataset``.

    Columns: ``id`` (stable content hash), ``source``, ``input_ids``, ``labels`` (-100 on the prompt),
    ``n_prompt``, ``n_response``, ``prompt_truncated``, ``response_ids`` (the response tokenised
    alone, for IFD).

    The records are read, validated, de-duplicated and tokenised in one streaming pass into an Arrow
    file (:func:`write_store`) that the stages read in batches, so the memory a pool takes does not
    grow with its size. The file lives in ``<paths.cache_dir>/pools/`` (the system's temporary
    folder without one) until the dataset is released; inside :func:`shared_pools` (one pipeline
    run) every stage that asks for the same pool gets the same file.

    Args:
        keep_in: build the store as ``keep_in/pool.arrow`` (+ ``pool.json``, the counts) and keep
            it there, or open it when it is there already: the warm-up keeps the pool it tokenised
            in its own output folder.
        reuse_from: a folder where an earlier stage kept the store (the warm-up's, whose key holds
            everything the pool depends on): opened instead of tokenising again when present.
    """
    memo = _pool_memo_key(cfg, tokenizer) if _SHARED is not None else None
    if memo is not None and memo in _SHARED:
        ds, stats = _SHARED[memo][:2]
        return (ds, dict(stats)) if return_stats else ds
    kept = next((Path(f) for f in (reuse_from, keep_in) if f and _is_store(Path(f))), None)
    if kept is not None:
        ds, stats, folder = _open_store(kept), read_json(kept / STORE_STATS), None
    elif keep_in is not None:
        ds, stats = _build(cfg, tokenizer, Path(keep_in), keep=True)
        folder = None
    else:
        folder = new_store_dir(cfg_get(cfg_get(cfg, "paths") or {}, "cache_dir"))
        ds, stats = _build(cfg, tokenizer, folder, keep=False)
    if memo is not None:
        _SHARED[memo] = (ds, stats, folder)
    elif folder is not None:
        weakref.finalize(ds, shutil.rmtree, folder, True)
    return (ds, dict(stats)) if return_stats else ds


def _build(cfg: Any, tokenizer, folder: Path, keep: bool):
    """Stream, tokenise and write the pool's store in ``folder``; ``(dataset, stats)``. A failed
    build leaves nothing: the temporary folder is removed, a kept store is renamed into place
    only once complete."""
    domain, data_cfg = cfg_get(cfg, "domain"), cfg_get(cfg, "data")
    if cfg_get(domain, "generator"):
        materialise_generated(domain, cfg)
    part = folder / f"{STORE_FILE}.{os.getpid()}.partial"
    try:
        counts: Counter = Counter()
        records = iter_pool_records(domain, data_cfg, counts)
        tok_stats = write_store(records, tokenizer, data_cfg, part)
        log_counts(counts)
        stats = {**counts, **tok_stats}
        step = f"tokenising to data.max_seq_len={tok_stats['max_seq_len']}"
        require_records(
            tok_stats["n_samples"], domain, f"{step} (every response was cut away)", stats
        )
        write_json(folder / STORE_STATS, stats)
        os.replace(part, folder / STORE_FILE)
    except BaseException:
        part.unlink(missing_ok=True)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return _open_store(folder), stats


def _is_store(folder: Path) -> bool:
    return (folder / STORE_FILE).is_file() and (folder / STORE_STATS).is_file()


def _open_store(folder: Path):
    from datasets import Dataset

    return Dataset.from_file(str(folder / STORE_FILE))


STORE_FILE = "pool.arrow"
STORE_STATS = "pool.json"  # the counts of the pass that wrote the store
STORE_BATCH = 1024  # rows per Arrow record batch


def store_features():
    """The Arrow schema of the tokenised pool (token ids as int32)."""
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features(
        {
            "id": Value("string"),
            "source": Value("string"),
            "input_ids": ids,
            "labels": ids,
            "n_prompt": Value("int64"),
            "n_response": Value("int64"),
            "prompt_truncated": Value("bool"),
            "response_ids": ids,
        }
    )


def write_store(records: Iterable[Record], tokenizer, data_cfg: Any, path: Path) -> dict:
    """Tokenise ``records`` (:func:`tokenize_record`) into the Arrow file ``path``, a batch at a
    time; samples left with fewer than ``data.min_response_tokens`` are reported and dropped.

    Returns:
        ``n_samples``, ``dropped_no_response``, ``prompt_truncated``, ``max_seq_len``.
    """
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    data = _data_settings(data_cfg)
    max_len, min_resp = int(data["max_seq_len"]), int(data["min_response_tokens"])
    n = truncated = n_dropped = 0
    dropped: list[str] = []  # the first few, for the log
    pending: list[Record] = []
    with ArrowWriter(features=store_features(), path=str(path)) as writer:

        def flush() -> None:
            nonlocal n, truncated, n_dropped
            kept = []
            for s in tokenize_batch(pending, tokenizer, max_len):
                truncated += s["prompt_truncated"]
                if s["n_response"] < min_resp:
                    n_dropped += 1
                    dropped.extend([s["id"]] if len(dropped) < 5 else [])
                else:
                    kept.append(s)
            if kept:
                writer.write_batch(_columns(kept))
            n += len(kept)
            pending.clear()

        for rec in tqdm(records, desc="tokenise", unit="sample", delay=2, mininterval=2):
            pending.append(rec)
            if len(pending) == STORE_BATCH:
                flush()
        flush()
        writer.finalize()
    if n_dropped:
        log.warning(
            "data: %d samples have no response token left after truncation to %d tokens "
            "and were dropped (first ids: %s)",
            n_dropped,
            max_len,
            dropped,
        )
    return {
        "n_samples": n,
        "dropped_no_response": n_dropped,
        "prompt_truncated": truncated,
        "max_seq_len": max_len,
    }


def _columns(rows: list[dict]) -> dict[str, list]:
    return {c: [r[c] for r in rows] for c in rows[0]}


# --------------------------------------------------------------------------------------------------
# Where the stores live: one folder per store, removed with its dataset or at the end of the run
# --------------------------------------------------------------------------------------------------
_SHARED: dict | None = None  # inside shared_pools(): {memo key: (dataset, stats, folder)}


@contextmanager
def shared_pools() -> Iterator[None]:
    """Within this block :func:`load_pool` builds each pool once and hands every later caller the
    same memory-mapped dataset; the files are removed when the outermost block ends."""
    global _SHARED
    outer = _SHARED
    if outer is None:
        _SHARED = {}
    try:
        yield
    finally:
        if outer is None:
            folders = [entry[2] for entry in _SHARED.values()]
            _SHARED = None
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)


def _pool_memo_key(cfg: Any, tokenizer) -> str:
    """What a tokenised pool depends on within one run: domain, data settings and tokenizer."""
    from grads.config_access import as_dict
    from grads.hashing import digest

    return digest(
        {
            "domain": as_dict(cfg_get(cfg, "domain")),
            "data": _data_settings(cfg_get(cfg, "data")),
            "tokenizer": [
                getattr(tokenizer, "name_or_path", None),
                len(tokenizer),
                getattr(tokenizer, "chat_template", None),
            ],
        }
    )


def new_store_dir(cache_dir: Any = None) -> Path:
    """A new folder ``<cache_dir>/pools/<host>-<pid>-<random>`` (under the system's temporary
    folder without ``cache_dir``); folders left by processes of this host that no longer run (a
    killed run) are removed first."""
    import os
    import socket
    import tempfile

    from grads.locks import pid_alive

    root = Path(str(cache_dir)) if cache_dir else Path(tempfile.gettempdir()) / "grads"
    root = root / "pools"
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in root.iterdir():
        parts = old.name.rsplit("-", 2)
        mine = len(parts) == 3 and parts[0] == host and parts[1].isdigit()
        if mine and not pid_alive(int(parts[1])):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{host}-{os.getpid()}-", dir=root))


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
