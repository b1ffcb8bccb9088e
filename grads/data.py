"""Domain SFT pools: read files (or hub datasets), map records to chat messages, tokenise, mask.

A domain config (``conf/domain/*.yaml``) lists ``sources``; each source names a file (or hub id), a
``reader`` for its layout, and ``prompt``/``response`` templates over the record's fields. The
pipeline is::

    read rows -> validate fields -> render prompt/response -> decontaminate against eval sets
      -> de-duplicate -> pool_limit (deterministic) -> chat template + tokenise -> mask prompt

Every sample gets a stable id (a hash of its prompt and response), so selections compare across runs.
Bad input never raises a bare ``KeyError`` and is never dropped silently: with
``data.on_bad_row=error`` (default) the first bad row raises :class:`BadRecordError` naming file, row
and field; with ``skip`` the bad rows are counted and logged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class BadRecordError(ValueError):
    """A record that cannot be turned into a training sample; the message names file, row and field."""

    def __init__(self, file: str, row: int | str, field_name: str | None, problem: str):
        self.file, self.row, self.field, self.problem = file, row, field_name, problem
        where = f"{file}, row {row}" + (f", field '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {problem}")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None and default is not None else value


# --------------------------------------------------------------------------------------------------
# Readers: each yields (row_number, flat dict). Row numbers are 1-based data rows (JSONL: the line).
# --------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRecordError(str(path), i, None, f"invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise BadRecordError(
                    str(path), i, None, f"expected a JSON object, got {type(obj).__name__}"
                )
            yield i, obj


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    """A JSON list of objects, or a dict of id -> object (the key is kept as ``_key``)."""
    with open(path, encoding="utf-8-sig") as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as exc:
            raise BadRecordError(str(path), exc.lineno, None, f"invalid JSON ({exc.msg})") from exc
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for i, (key, rec) in enumerate(items, start=1):
        if not isinstance(rec, dict):
            raise BadRecordError(
                str(path), i, None, f"expected an object, got {type(rec).__name__}"
            )
        yield i, {"_key": str(key), **rec}


def _read_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        yield from enumerate(reader, start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _read_pubmedqa(path: Path, split: str = "train", test_file: str = "test_ground_truth.json"):
    """PubMedQA PQA-L: ``ori_pqal.json`` (PMID -> record); the official test = keys of ``test_file``."""
    test_ids = set(json.loads((path.parent / test_file).read_text()))
    for i, rec in _read_json(path):
        in_test = rec["_key"] in test_ids
        if (split == "test") == in_test:
            contexts = rec.get("CONTEXTS") or []
            yield (
                i,
                {**rec, "context": " ".join(contexts) if isinstance(contexts, list) else contexts},
            )


def _read_fiqa_post(path: Path):
    """FiQA 2018 task-1 posts: id -> {sentence, info: [{sentiment_score, ...}]}; flattened."""
    for i, rec in _read_json(path):
        info = (rec.get("info") or [{}])[0]
        yield (
            i,
            {
                "sentence": rec.get("sentence"),
                "score": info.get("sentiment_score"),
                "_key": rec["_key"],
            },
        )


def _read_tatqa(path: Path):
    """TAT-QA: contexts with a table, paragraphs and questions -> one row per question."""
    n = 0
    for _, ctx in _read_json(path):
        table = "\n".join(" | ".join(str(c) for c in row) for row in ctx["table"]["table"])
        paras = "\n".join(p["text"] for p in sorted(ctx["paragraphs"], key=lambda p: p["order"]))
        for q in ctx["questions"]:
            n += 1
            ans = q.get("answer")
            ans = ", ".join(map(str, ans)) if isinstance(ans, list) else str(ans)
            if q.get("scale"):
                ans = f"{ans} {q['scale']}"
            yield (
                n,
                {
                    "table": table,
                    "paragraphs": paras,
                    "question": q["question"],
                    "answer": ans,
                    "uid": q["uid"],
                },
            )


READERS: dict[str, Callable[..., Iterator[tuple[int, dict]]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": lambda p: _read_delimited(p, ","),
    "tsv": lambda p: _read_delimited(p, "\t"),
    "parquet": _read_parquet,
    "pubmedqa": _read_pubmedqa,
    "fiqa_post": _read_fiqa_post,
    "tatqa": _read_tatqa,
}


def _infer_reader(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in READERS:
        # Several shared files are JSON Lines despite a .json extension (e.g. MedMCQA dev.json).
        if suffix == "json":
            with open(path, encoding="utf-8-sig") as fh:
                first = fh.readline().strip()
            if first.startswith("{") and first.endswith("}"):
                return "jsonl"
        return suffix
    raise ValueError(f"{path}: cannot infer the file format from '{path.suffix}'; set `reader:`")


def _read_hub(source: Any) -> Iterator[tuple[int, dict]]:
    """Rows of a Hugging Face hub dataset (online users; needs network access)."""
    from datasets import load_dataset

    ds = load_dataset(
        _get(source, "hub_id"), _get(source, "hub_config"), split=_get(source, "split", "train")
    )
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def read_source(source: Any) -> tuple[str, Iterator[tuple[int, dict]]]:
    """Open one configured source; returns ``(display_name, rows)``.

    Raises:
        FileNotFoundError: the file does not exist (the message names the source and path).
    """
    if _get(source, "hub_id") and not _get(source, "path"):
        return str(_get(source, "hub_id")), _read_hub(source)
    path = Path(str(_get(source, "path")))
    if not path.exists():
        raise FileNotFoundError(
            f"data source '{_get(source, 'name', path.stem)}': file not found: {path} "
            "(set paths.data_dir or GRADS_DATA_DIR)"
        )
    reader = _get(source, "reader") or _infer_reader(path)
    if reader not in READERS:
        raise ValueError(
            f"data source '{_get(source, 'name')}': unknown reader {reader!r}; "
            f"expected one of {sorted(READERS)}"
        )
    kwargs = dict(_get(source, "reader_kwargs") or {})
    return str(path), READERS[reader](path, **kwargs)


# --------------------------------------------------------------------------------------------------
# Records: validated, rendered prompt/response pairs
# --------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One SFT pair before tokenisation."""

    id: str
    source: str
    prompt: str
    response: str
    system: str | None = None
    meta: dict = field(default_factory=dict)


def sample_id(prompt: str, response: str, system: str | None = None) -> str:
    """Stable content hash: identical (system, prompt, response) -> identical id across runs."""
    h = hashlib.sha1()
    for part in (system or "", prompt, response):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def is_heldout(text: str, frac: float = 0.1) -> bool:
    """Deterministic held-out split by content hash (used to carve an eval split from a pool).

    Splitting by the text itself (not the row) keeps every copy of a text on one side, as the
    LegalBench README asks for CUAD clauses that recur across tasks.
    """
    digest = hashlib.sha1(normalise_text(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < frac


def normalise_text(text: str) -> str:
    """Lower-case, collapse whitespace: the key used for decontamination and held-out splits."""
    return " ".join(str(text).lower().split())


_FORMATTER = string.Formatter()


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in _FORMATTER.parse(template) if name]


def _label_map(value: Any, spec: Any) -> Any:
    """Map a raw value through a config ``map`` (dict) or threshold spec for numeric scores."""
    if spec is None:
        return value
    if _get(spec, "thresholds") is not None:
        lo, hi = _get(spec, "thresholds")
        x = float(value)
        return _get(spec, "labels")[0 if x < lo else 2 if x > hi else 1]
    return dict(spec).get(str(value), value)


def _filter_ok(row: dict, spec: Any) -> bool:
    """``filter: {field: value}`` keeps rows whose field equals value; a list means "one of"."""
    if not spec:
        return True
    for key, want in dict(spec).items():
        have = row.get(key)
        wants = [want] if isinstance(want, str | int | float | bool) or want is None else list(want)
        if have not in wants and str(have) not in [str(w) for w in wants]:
            return False
    return True


def records_from_source(
    source: Any, on_bad_row: str = "error", system: str | None = None, counts: Counter | None = None
) -> list[Record]:
    """Read one source and render its rows into :class:`Record` objects.

    Required fields are those named in the ``prompt``/``response`` templates (plus ``fields``).
    Each must be present and a non-empty string (numbers are accepted and converted).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row={on_bad_row!r}: expected 'error' or 'skip'")
    counts = counts if counts is not None else Counter()
    name = str(_get(source, "name", "source"))
    prompt_t, response_t = str(_get(source, "prompt")), str(_get(source, "response"))
    # key_field: the text that decides held-out splits and decontamination (e.g. the CUAD clause).
    key_field = _get(source, "key_field")
    required = list(
        dict.fromkeys(
            _template_fields(prompt_t)
            + _template_fields(response_t)
            + list(_get(source, "fields") or [])
            + ([key_field] if key_field else [])
        )
    )
    maps = dict(_get(source, "map") or {})
    file, rows = read_source(source)
    out: list[Record] = []
    seen_columns = None
    for row_no, row in rows:
        if not _filter_ok(row, _get(source, "filter")):
            counts[f"{name}:filtered"] += 1
            continue
        try:
            values = {}
            for f in required:
                if f not in row:
                    if seen_columns is None:
                        seen_columns = sorted(k for k in row if not k.startswith("_"))
                    raise BadRecordError(file, row_no, f, f"missing field (row has {seen_columns})")
                v = row[f]
                if isinstance(v, list) and v and _get(source, "list_mode") in ("first", "join"):
                    # e.g. BioASQ's ideal_answer is a list of equivalent expert answers.
                    v = v[0] if _get(source, "list_mode") == "first" else " ".join(map(str, v))
                if isinstance(v, bool) or v is None or isinstance(v, list | dict):
                    raise BadRecordError(
                        file, row_no, f, f"expected a string, got {type(v).__name__}"
                    )
                if isinstance(v, int | float):
                    v = str(v)
                if not isinstance(v, str):
                    raise BadRecordError(
                        file, row_no, f, f"expected a string, got {type(v).__name__}"
                    )
                if f in maps:
                    try:
                        v = str(_label_map(v, maps[f]))
                    except (ValueError, TypeError) as exc:
                        raise BadRecordError(
                            file, row_no, f, f"cannot map value {v!r}: {exc}"
                        ) from exc
                if not v.strip():
                    raise BadRecordError(file, row_no, f, "empty string")
                values[f] = v.strip()
        except BadRecordError:
            if on_bad_row == "error":
                raise
            counts[f"{name}:bad_row"] += 1
            continue
        prompt, response = prompt_t.format(**values), response_t.format(**values)
        out.append(
            Record(
                id=sample_id(prompt, response, system),
                source=name,
                prompt=prompt,
                response=response,
                system=system,
                meta={"row": row_no, "key_text": values.get(key_field) if key_field else None},
            )
        )
    return out


def _eval_texts(spec: Any) -> set[str]:
    """Normalised texts of an evaluation file, for decontaminating a train pool against it."""
    file, rows = read_source(spec)
    field_name, pattern = _get(spec, "field"), _get(spec, "extract")
    regex = re.compile(pattern, re.S) if pattern else None
    texts = set()
    for _, row in rows:
        if not _filter_ok(row, _get(spec, "filter")):
            continue
        value = row.get(field_name)
        if value is None:
            continue
        value = str(value)
        if regex is not None:
            m = regex.search(value)
            if not m:
                continue
            value = m.group(1)
        texts.add(normalise_text(value))
    return texts


def decontaminate(records: list[Record], domain: Any, counts: Counter) -> list[Record]:
    """Drop train records whose key text matches any evaluation item the domain lists.

    ``domain.decontaminate`` is a list of ``{path, field, extract?, filter?}`` specs; a record is
    dropped when its normalised key text (the source's ``key_field``, else its prompt) equals an
    evaluation item's text. A ``heldout`` spec
    ``{heldout: {source, frac}}`` drops the hash-based held-out split (see :func:`is_heldout`).
    """
    specs = list(_get(domain, "decontaminate") or [])
    if not specs:
        return records
    eval_texts: set[str] = set()
    heldout: dict[str, float] = {}
    for spec in specs:
        if _get(spec, "heldout_source"):
            heldout[str(_get(spec, "heldout_source"))] = float(_get(spec, "frac", 0.1))
        else:
            eval_texts |= _eval_texts(spec)
    keep = []
    for rec in records:
        key = rec.meta.get("key_text")
        if rec.source in heldout and is_heldout(key or rec.prompt, heldout[rec.source]):
            counts[f"{rec.source}:heldout_for_eval"] += 1
            continue
        if eval_texts and _matches_eval(rec, eval_texts):
            counts[f"{rec.source}:eval_overlap"] += 1
            continue
        keep.append(rec)
    return keep


def _matches_eval(rec: Record, eval_texts: set[str]) -> bool:
    """Exact match of the record's key text (or whole prompt) against normalised eval items."""
    key = rec.meta.get("key_text")
    return normalise_text(key if key is not None else rec.prompt) in eval_texts


def load_records(domain: Any, data_cfg: Any = None) -> tuple[list[Record], dict]:
    """All records of a domain's train pool after validation, decontamination, dedup and pool_limit.

    Returns:
        ``(records, stats)`` where stats counts rows read, skipped, filtered, duplicates, etc.
    """
    on_bad_row = _get(data_cfg, "on_bad_row", "error")
    system = _get(data_cfg, "system_prompt")
    counts: Counter = Counter()
    records: list[Record] = []
    for source in _get(domain, "sources") or []:
        if _get(source, "enabled", True) is False:
            continue
        recs = records_from_source(source, on_bad_row=on_bad_row, system=system, counts=counts)
        counts[f"{_get(source, 'name')}:read"] += len(recs)
        records += recs
    if not records:
        raise ValueError(
            f"domain '{_get(domain, 'name')}': no training records (check its sources)"
        )
    records = decontaminate(records, domain, counts)
    if _get(data_cfg, "dedup", True):
        seen, unique = set(), []
        for rec in records:
            if rec.id in seen:
                counts["duplicates_removed"] += 1
                continue
            seen.add(rec.id)
            unique.append(rec)
        records = unique
    from grads.heldout import exclude_heldout  # the held-out split never enters any pool

    records = exclude_heldout(records, domain, counts)
    limit = _get(domain, "pool_limit")
    if limit is not None and int(limit) < len(records):
        # Deterministic subsample: order by a hash of (id, pool_seed), independent of file order.
        seed = str(_get(domain, "pool_seed", 0))
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
    max_len = int(_get(data_cfg, "max_seq_len", 256))
    min_resp = int(_get(data_cfg, "min_response_tokens", 1))
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

    domain, data_cfg = _get(cfg, "domain"), _get(cfg, "data")
    if _get(domain, "generator"):
        materialise_generated(domain, cfg)
    records, stats = load_records(domain, data_cfg)
    samples, tok_stats = tokenize_records(records, tokenizer, data_cfg)
    stats.update(tok_stats)
    ds = Dataset.from_list(samples)
    return (ds, stats) if return_stats else ds


def materialise_generated(domain: Any, cfg: Any) -> None:
    """Write a generated domain's files (e.g. ``synthetic``) if its sources are missing."""
    from grads import synthetic

    gen = _get(domain, "generator")
    out_dir = Path(str(_get(gen, "out_dir")))
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
