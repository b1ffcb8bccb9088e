"""Records of a domain's sources: validated rows rendered into prompt/response pairs, and
the decontamination of a pool against evaluation sets.

A domain config (``conf/domain/*.yaml``) lists ``sources``; each source names a file (or hub id), a
``reader`` for its layout (:mod:`grads.data.readers`), and ``prompt``/``response`` templates over
the record's fields. Every record gets a stable id (a hash of its prompt and response), so
selections compare across runs. With ``data.on_bad_row=error`` (default) the first bad row raises
:class:`~grads.data.readers.BadRecordError` naming file, row and field; with ``skip`` every kind of
bad row is skipped and counted per source and kind (``<source>:bad_row:<kind>``).

The pool built from these records (dedup, held-out exclusion, ``pool_limit``, tokenisation) is
:mod:`grads.data.pool`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from grads.config_access import cfg_get
from grads.data.readers import UNDECODABLE, BadRecordError, not_utf8_error, read_source

log = logging.getLogger(__name__)


SOURCE_KEYS = (
    "name",
    "path",
    "hub_id",
    "hub_config",
    "split",
    "reader",
    "reader_kwargs",
    "prompt",
    "response",
    "key_field",
    "fields",
    "map",
    "list_mode",
    "filter",
    "enabled",
    # a source with its own reader (`builder`, e.g. grads.data.custom_pool.iter_custom_records) and the
    # knobs that reader takes
    "builder",
    "format",
    "mode",
    "messages_field",
    "optional_fields",
)
DECONTAMINATE_KEYS = (
    "name",
    "path",
    "hub_id",
    "hub_config",
    "split",
    "reader",
    "reader_kwargs",
    "field",
    "extract",
    "filter",
    "heldout_source",
    "frac",
)
# Skipped rows logged one by one (file, row, problem); the rest are counted per kind only.
LOGGED_BAD_ROWS = 5


def skip_bad_row(exc: BadRecordError, name: str, counts: Counter) -> None:
    """Skip mode: count a bad row as ``<name>:bad_row`` and ``<name>:bad_row:<kind>``; the first
    :data:`LOGGED_BAD_ROWS` of a source are logged with file and row."""
    counts[f"{name}:bad_row"] += 1
    counts[f"{name}:bad_row:{exc.kind}"] += 1
    n = counts[f"{name}:bad_row"]
    if n <= LOGGED_BAD_ROWS:
        log.warning("data: %s: skipped a bad row (%s): %s", name, exc.kind, exc)
    elif n == LOGGED_BAD_ROWS + 1:
        log.warning(
            "data: %s: skipping more bad rows; metrics.json counts them per kind (data)", name
        )


@dataclass(slots=True)
class Record:
    """One SFT pair before tokenisation (slots: an export holds tens of thousands)."""

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
    if cfg_get(spec, "thresholds") is not None:
        lo, hi = cfg_get(spec, "thresholds")
        x = float(value)
        return cfg_get(spec, "labels")[0 if x < lo else 2 if x > hi else 1]
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


def _row_values(row: dict, source: Any, required: list[str], file: str, row_no: int) -> dict:
    """The validated, stripped string values of ``required`` fields of one row.

    Raises:
        BadRecordError: a field is missing, not a string/number, empty, not UTF-8 or unmappable.
    """
    maps = dict(cfg_get(source, "map") or {})
    list_mode = cfg_get(source, "list_mode")
    values = {}
    for f in required:
        if f not in row:
            columns = sorted(str(k) for k in row if not str(k).startswith("_"))
            raise BadRecordError(
                file, row_no, f, f"missing field (row has {columns})", "missing_field"
            )
        v = row[f]
        if isinstance(v, list) and v and list_mode in ("first", "join"):
            # e.g. BioASQ's ideal_answer is a list of equivalent expert answers.
            v = v[0] if list_mode == "first" else " ".join(map(str, v))
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            problem = f"expected a string, got {type(v).__name__}"
            raise BadRecordError(file, row_no, f, problem, "wrong_type")
        if UNDECODABLE.search(v):
            raise not_utf8_error(file, row_no, f, row)
        if f in maps:
            try:
                v = str(_label_map(v, maps[f]))
            except (ValueError, TypeError, IndexError) as exc:
                problem = f"cannot map value {v!r}: {exc}"
                raise BadRecordError(file, row_no, f, problem, "unmappable") from exc
        if not v.strip():
            raise BadRecordError(file, row_no, f, "empty string", "empty_field")
        values[f] = v.strip()
    return values


def _required_fields(source: Any) -> list[str]:
    """Fields named in the ``prompt``/``response`` templates, plus ``fields`` and ``key_field``."""
    key_field = cfg_get(source, "key_field")
    return list(
        dict.fromkeys(
            _template_fields(str(cfg_get(source, "prompt")))
            + _template_fields(str(cfg_get(source, "response")))
            + list(cfg_get(source, "fields") or [])
            + ([key_field] if key_field else [])
        )
    )


def records_from_source(
    source: Any, on_bad_row: str = "error", system: str | None = None, counts: Counter | None = None
) -> list[Record]:
    """Every record of one source as a list (:func:`iter_source_records`, read to the end)."""
    return list(iter_source_records(source, on_bad_row, system, counts))


def iter_source_records(
    source: Any, on_bad_row: str = "error", system: str | None = None, counts: Counter | None = None
) -> Iterator[Record]:
    """Read one source and render its rows into :class:`Record` objects, one at a time.

    Required fields are those named in the ``prompt``/``response`` templates (plus ``fields`` and
    ``key_field``). Each must be present and a non-empty string (numbers are converted).

    Args:
        source: a ``domain.sources`` entry.
        on_bad_row: ``error`` raises at the first bad row; ``skip`` skips it and counts it in
            ``counts`` as ``<name>:bad_row`` and ``<name>:bad_row:<kind>`` (:func:`skip_bad_row`).
        system: optional system prompt (part of the sample id).
        counts: a Counter to add read/filtered/bad counts to.

    Raises:
        BadRecordError: a bad row (``error`` mode), an empty file, or (either mode) a source whose
            rows are all bad, which is a mapping mistake rather than bad data.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row={on_bad_row!r}: expected 'error' or 'skip'")
    counts = counts if counts is not None else Counter()
    name = str(cfg_get(source, "name", "source"))
    prompt_t, response_t = str(cfg_get(source, "prompt")), str(cfg_get(source, "response"))
    key_field = cfg_get(source, "key_field")
    required = _required_fields(source)
    file, rows = read_source(source)
    n_out, first_bad, bad_kinds = 0, None, Counter()  # bad rows: counted, the first one kept
    for row_no, row in rows:
        try:
            if isinstance(row, BadRecordError):
                raise row
            if not _filter_ok(row, cfg_get(source, "filter")):
                counts[f"{name}:filtered"] += 1
                continue
            values = _row_values(row, source, required, file, row_no)
        except BadRecordError as exc:
            if on_bad_row == "error":
                raise
            first_bad = first_bad or exc
            bad_kinds[exc.kind] += 1
            skip_bad_row(exc, name, counts)
            continue
        prompt, response = prompt_t.format(**values), response_t.format(**values)
        n_out += 1
        yield Record(
            id=sample_id(prompt, response, system),
            source=name,
            prompt=prompt,
            response=response,
            system=system,
            meta={"row": row_no, "key_text": values.get(key_field) if key_field else None},
        )
    n_bad = sum(bad_kinds.values())
    if first_bad is not None and not n_out:
        raise BadRecordError(
            file,
            first_bad.row,
            first_bad.field,
            f"all {n_bad} rows are bad (first: {first_bad.problem}): the source does not match "
            "the file (check its prompt/response templates and fields)",
            "all_rows_bad",
        )
    if n_bad:
        log.warning("data: %s: skipped %d bad rows %s", name, n_bad, dict(bad_kinds))


def eval_file_texts(spec: Any) -> set[str]:
    """Normalised texts of an evaluation file, for decontaminating a train pool against it."""
    file, rows = read_source(spec)
    field_name, pattern = cfg_get(spec, "field"), cfg_get(spec, "extract")
    regex = re.compile(pattern, re.S) if pattern else None
    texts = set()
    for row_no, row in rows:
        if isinstance(row, BadRecordError):  # an evaluation file must be read whole: never skip
            raise row
        if not _filter_ok(row, cfg_get(spec, "filter")):
            continue
        value = row.get(field_name)
        if value is None:
            continue
        value = str(value)
        if UNDECODABLE.search(value):
            raise not_utf8_error(file, row_no, field_name, row)
        if regex is not None:
            m = regex.search(value)
            if not m:
                continue
            value = m.group(1)
        texts.add(normalise_text(value))
    return texts


def decontaminate(records: Iterable[Record], domain: Any, counts: Counter) -> list[Record]:
    """The records :func:`contamination_filter` keeps, as a list."""
    keep = contamination_filter(domain, counts)
    return list(records) if keep is None else [rec for rec in records if keep(rec)]


def contamination_filter(domain: Any, counts: Counter) -> Callable[[Record], bool] | None:
    """A test that drops train records whose key text matches an evaluation item the domain lists
    (``None`` when the domain lists none); each drop is counted in ``counts``.

    ``domain.decontaminate`` is a list of ``{path, field, extract?, filter?}`` specs; a record is
    dropped when its normalised key text (the source's ``key_field``, else its prompt) equals an
    evaluation item's text. A ``heldout`` spec
    ``{heldout: {source, frac}}`` drops the hash-based held-out split (see :func:`is_heldout`).
    The evaluation files are read once, when the test is made.
    """
    specs = list(cfg_get(domain, "decontaminate") or [])
    if not specs:
        return None
    eval_texts: set[str] = set()
    heldout: dict[str, float] = {}
    for spec in specs:
        if cfg_get(spec, "heldout_source"):
            heldout[str(cfg_get(spec, "heldout_source"))] = float(cfg_get(spec, "frac", 0.1))
        else:
            eval_texts |= eval_file_texts(spec)

    def keep(rec: Record) -> bool:
        key = rec.meta.get("key_text")
        if rec.source in heldout and is_heldout(key or rec.prompt, heldout[rec.source]):
            counts[f"{rec.source}:heldout_for_eval"] += 1
            return False
        if eval_texts and matches_eval(rec, eval_texts):
            counts[f"{rec.source}:eval_overlap"] += 1
            return False
        return True

    return keep


def matches_eval(rec: Record, eval_texts: set[str]) -> bool:
    """Exact match of the record's key text (or whole prompt) against normalised eval items."""
    key = rec.meta.get("key_text")
    return normalise_text(key if key is not None else rec.prompt) in eval_texts


# --------------------------------------------------------------------------------------------------
# A domain's candidate records, streamed: sources -> decontamination -> de-duplication
# --------------------------------------------------------------------------------------------------
def source_records(
    source: Any, on_bad_row: str, system: str | None, counts: Counter
) -> Iterator[Record]:
    """One source's records, one at a time, counted as ``<name>:read``. A source with a ``builder``
    (the custom domain's) is read by it: any callable with :func:`iter_source_records`' signature
    that returns an iterable of records."""
    build: Callable[..., Iterable[Record]] = iter_source_records
    if cfg_get(source, "builder"):
        from hydra.utils import get_method

        build = get_method(str(cfg_get(source, "builder")))
    name = cfg_get(source, "name")
    counts[f"{name}:read"] += 0  # a source that yields nothing is still counted (as 0)
    for rec in build(source, on_bad_row=on_bad_row, system=system, counts=counts):
        counts[f"{name}:read"] += 1
        yield rec


def candidate_records(
    domain: Any, on_bad_row: str, system: str | None, counts: Counter, dedup: bool = True
) -> Iterator[Record]:
    """Every enabled source's records in order, without the evaluation items' matches and (with
    ``dedup``) without repeated ids, one at a time; what is dropped is counted in ``counts``.

    Memory: the decontamination texts and, with ``dedup``, one integer per distinct id.

    Raises:
        ValueError: nothing is left after reading the sources or after decontamination (raised at
            the end of the stream; the message names the step and the counts).
    """
    keep = contamination_filter(domain, counts)
    seen: set[int | str] = set()
    n_read = n_clean = 0
    for source in cfg_get(domain, "sources") or []:
        if cfg_get(source, "enabled", True) is False:
            continue
        for rec in source_records(source, on_bad_row, system, counts):
            n_read += 1
            if keep is not None and not keep(rec):
                continue
            n_clean += 1
            if dedup:
                key = id_key(rec.id)
                if key in seen:
                    counts["duplicates_removed"] += 1
                    continue
                seen.add(key)
            yield rec
    require_records(n_read, domain, "reading and filtering its sources", counts)
    require_records(n_clean, domain, "decontamination against its evaluation sets", counts)


def require_records(n: int, domain: Any, step: str, counts: Counter | dict) -> None:
    """An empty pool is an error that says which step emptied it, with the counts so far."""
    if not n:
        raise ValueError(
            f"domain '{cfg_get(domain, 'name')}': the train pool is empty after {step} "
            f"(counts: {dict(sorted(counts.items()))})"
        )


_HEX_ID = re.compile(r"[0-9a-f]{16}")


def id_key(sample: str) -> int | str:
    """A sample id as a set member: the 16 hex digits of :func:`sample_id` as one integer."""
    return int(sample, 16) if _HEX_ID.fullmatch(sample) else sample
