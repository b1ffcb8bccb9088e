"""Domain SFT pools: read files (or hub datasets), map records to chat messages, tokenise, mask.

A domain config (``conf/domain/*.yaml``) lists ``sources``; each source names a file (or hub id), a
``reader`` for its layout, and ``prompt``/``response`` templates over the record's fields. The
pipeline is::

    read rows -> validate fields -> render prompt/response -> decontaminate against eval sets
      -> de-duplicate -> pool_limit (deterministic) -> chat template + tokenise -> mask prompt

Every sample gets a stable id (a hash of its prompt and response), so selections compare across runs.
Bad input never raises a bare ``KeyError`` or ``UnicodeDecodeError`` and is never dropped silently:
with ``data.on_bad_row=error`` (default) the first bad row raises :class:`BadRecordError` naming
file, row and field (for bytes that are not UTF-8 also the byte, its offset in the file and its
line); with ``skip`` every kind of bad row (invalid JSON, bytes that are not UTF-8, a CSV row with
the wrong number of values, a missing, empty or mistyped field, an unmappable label) is skipped and
counted per source and kind (``<source>:bad_row:<kind>``), and the first few are logged with file
and row; the counts travel with the features stage into the run's ``metrics.json`` (``data``).
Problems that would make every row bad (an empty file, a source whose rows all fail, an empty pool)
are errors in either mode.
"""

from __future__ import annotations

import codecs
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

from grads.config import cfg_get
from grads.constants import IGNORE_INDEX
from grads.errors import UserError

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
    # a source with its own reader (`builder`, e.g. grads.custom_pool.records_from_custom) and the
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
# Lone surrogates: where bytes that are not UTF-8 end up after decoding with "surrogateescape"
# (U+DC80..U+DCFF), or a JSON escape such as "\\ud800" put them; neither can be encoded as text.
_UNDECODABLE = re.compile("[\ud800-\udfff]")


class BadRecordError(UserError, ValueError):
    """A record that cannot be turned into a training sample; the message names file, row and field.

    ``kind`` classifies the problem for the skip-mode counts (``invalid_json``, ``not_utf8``,
    ``not_an_object``, ``column_count``, ``missing_field``, ``wrong_type``, ``empty_field``,
    ``unmappable``, ``empty_file``, ``all_rows_bad``; custom pools add ``empty_render``,
    ``unknown_role`` and ``bad_turn_order``).
    """

    def __init__(
        self,
        file: str,
        row: int | str | None,
        field_name: str | None,
        problem: str,
        kind: str = "invalid",
    ):
        self.file, self.row, self.field, self.problem, self.kind = (
            file,
            row,
            field_name,
            problem,
            kind,
        )
        where = str(file) + (f", row {row}" if row is not None else "")
        where += f", field '{field_name}'" if field_name else ""
        super().__init__(_printable(f"{where}: {problem}"))


def _printable(text: str) -> str:
    """``text`` with undecodable bytes as ``\\xNN`` (names read from a file may hold them), so
    that it prints anywhere."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Row(dict):
    """A row read from a text file whose bytes are not all UTF-8, with where those bytes are.

    ``at`` is ``(file, start, end, line)``: the row's byte span in the file and the line it starts
    on; ``keyed`` says whether the field names are written inside the span (JSON) or in a header
    (CSV). Readers return plain dicts for every other row.
    """

    __slots__ = ("at", "keyed")

    def __init__(self, row: dict, at: tuple[str, int, int, int], keyed: bool = True):
        super().__init__(row)
        self.at, self.keyed = at, keyed


def _bad_bytes(data: bytes) -> list[int]:
    """Offsets of the bytes of ``data`` that are not UTF-8 (one per ``surrogateescape`` char)."""
    out, i = [], 0
    while True:
        try:
            data[i:].decode("utf-8")
            return out
        except UnicodeDecodeError as exc:
            out += range(i + exc.start, i + exc.end)
            i += exc.end


def _n_undecodable(text: str) -> int:
    return len(_UNDECODABLE.findall(text))


def _byte_position(row: dict, field_name: str) -> tuple[int, int] | None:
    """``(byte offset in the file, line)`` of the first undecodable byte of ``row[field_name]``,
    where the reader recorded the row's span (:class:`Row`)."""
    if not isinstance(row, Row):
        return None
    file, start, end, line = row.at
    with open(file, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    bad = _bad_bytes(data)
    if not bad:
        return None
    # The k-th undecodable char of the row, in the order the file writes keys and values.
    k, total = None, 0
    for key, value in row.items():
        if key == field_name:
            k = total
        total += (_n_undecodable(str(key)) if row.keyed else 0) + _n_undecodable(_text(value))
    rel = bad[k] if k is not None and total == len(bad) else bad[0]
    return start + rel, line + data[:rel].count(b"\n")


def not_utf8_error(file: str, row_no: int | None, field_name: str, row: dict) -> BadRecordError:
    """A ``not_utf8`` error for ``row[field_name]`` (or its name) naming the byte, and its offset
    in the file and line where the reader recorded them."""
    value = _text(row.get(field_name))
    m = _UNDECODABLE.search(str(field_name)) or _UNDECODABLE.search(value)
    code = ord(m.group()) if m else 0
    byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone \\u{code:04x}"
    pos = _byte_position(row, field_name)
    where = f" at byte offset {pos[0]}, line {pos[1]}" if pos else ""
    if not pos and m and m.string == value:
        where = f" at character {m.start() + 1} of the value"
    return BadRecordError(file, row_no, field_name, f"not valid UTF-8 ({byte}{where})", "not_utf8")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def undecodable_field(row: dict) -> str | None:
    """The first field whose name or text holds bytes that were not UTF-8 (nested values too)."""
    for key, value in row.items():
        if _UNDECODABLE.search(str(key)) or (
            isinstance(value, str | dict | list) and _UNDECODABLE.search(_text(value))
        ):
            return str(key)
    return None


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


# --------------------------------------------------------------------------------------------------
# Readers: each yields (row_number, flat dict | BadRecordError). Row numbers are 1-based data rows
# (JSONL: the line). A bad row is yielded, not raised, so that skip mode can count it and go on;
# problems with the whole file (empty, not parseable at all) raise.
# --------------------------------------------------------------------------------------------------
def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | BadRecordError]]:
    n, pos = 0, 0
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            start, pos = pos, pos + len(raw)
            if i == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            line = raw.decode("utf-8", errors="surrogateescape")
            if not line.strip():
                continue
            n += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                extra = ""
                if _UNDECODABLE.search(line):
                    first = _bad_bytes(raw)[0]
                    extra = f"; the line is also not valid UTF-8 (byte 0x{raw[first]:02x} at "
                    extra += f"byte offset {start + first})"
                yield i, BadRecordError(
                    str(path), i, None, f"invalid JSON ({exc.msg}, column {exc.colno}){extra}",
                    kind="invalid_json",
                )  # fmt: skip
                continue
            if not isinstance(obj, dict):
                problem = f"expected a JSON object, got {type(obj).__name__}"
                yield i, BadRecordError(str(path), i, None, problem, kind="not_an_object")
                continue
            yield i, Row(obj, (str(path), start, pos, i)) if _UNDECODABLE.search(line) else obj
    if n == 0:
        raise BadRecordError(str(path), None, None, "empty file (no JSON lines)", kind="empty_file")


def _read_json(path: Path) -> Iterator[tuple[int, dict | BadRecordError]]:
    """A JSON list of objects, or a dict of id -> object (the key is kept as ``_key``)."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        text = fh.read()
    if not text.strip():
        raise BadRecordError(str(path), None, None, "empty file (no JSON document)", "empty_file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:  # one document: nothing in it can be read, in any mode
        raise BadRecordError(
            str(path), exc.lineno, None, f"invalid JSON ({exc.msg}, column {exc.colno})",
            kind="invalid_json",
        ) from exc  # fmt: skip
    if not isinstance(obj, dict | list):
        problem = f"expected a list or an object of records, got {type(obj).__name__}"
        raise BadRecordError(str(path), None, None, problem, "not_an_object")
    items = list(obj.items() if isinstance(obj, dict) else enumerate(obj))
    spans = _json_spans(path, text, len(items)) if _UNDECODABLE.search(text) else None
    for i, (key, rec) in enumerate(items, start=1):
        if not isinstance(rec, dict):
            problem = f"expected an object, got {type(rec).__name__}"
            yield i, BadRecordError(str(path), i, None, problem, kind="not_an_object")
            continue
        row = {"_key": str(key), **rec}
        yield i, Row(row, spans[i - 1]) if spans else row


_WS = re.compile(r"[ \t\n\r]*")


def _json_spans(path: Path, text: str, n: int) -> list[tuple[str, int, int, int]] | None:
    """``(file, start byte, end byte, line)`` of each top-level item of a valid JSON list or
    object (an object's item starts at its key); ``None`` when they do not pair with the
    ``n`` items read (duplicate keys)."""
    dec, i = json.JSONDecoder(), _WS.match(text).end()
    opener = text[i]
    close, i = "]" if opener == "[" else "}", _WS.match(text, i + 1).end()
    chars: list[tuple[int, int]] = []
    while text[i] != close:
        start = i
        if opener == "{":  # the key, the colon
            i = _WS.match(text, dec.raw_decode(text, i)[1]).end() + 1
            i = _WS.match(text, i).end()
        i = dec.raw_decode(text, i)[1]
        chars.append((start, i))
        i = _WS.match(text, i).end()
        i = _WS.match(text, i + 1).end() if text[i] == "," else i
    if len(chars) != n:
        return None
    with open(path, "rb") as fh:
        bom = len(codecs.BOM_UTF8) if fh.read(3) == codecs.BOM_UTF8 else 0
    spans, byte, line, last = [], bom, 1, 0
    for a, b in chars:  # characters -> bytes: each undecodable byte is one char
        byte += len(text[last:a].encode("utf-8", "surrogateescape"))
        line += text.count("\n", last, a)
        end = byte + len(text[a:b].encode("utf-8", "surrogateescape"))
        spans.append((str(path), byte, end, line))
        line += text.count("\n", a, b)
        byte, last = end, b
    return spans


class _Lines:
    """The lines of a binary file decoded with ``surrogateescape`` (``\\n``, ``\\r\\n`` and
    ``\\r`` end a line, as in universal newlines), with the byte offset after the last one read."""

    def __init__(self, fh):
        self.fh, self.end = fh, 0

    def __iter__(self) -> Iterator[str]:
        for i, chunk in enumerate(self.fh):
            if i == 0 and chunk.startswith(codecs.BOM_UTF8):
                chunk, self.end = chunk[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            for raw in chunk.splitlines(keepends=True):
                self.end += len(raw)
                yield raw.decode("utf-8", errors="surrogateescape")


def _read_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict | BadRecordError]]:
    """CSV/TSV rows as dicts; a row with more or fewer values than the header has is bad."""
    with open(path, "rb") as fh:
        lines = _Lines(fh)
        reader = csv.DictReader(lines, delimiter=delimiter)
        columns = reader.fieldnames
        if not columns:
            raise BadRecordError(str(path), None, None, "empty file (no header row)", "empty_file")
        bad = next((c for c in columns if _UNDECODABLE.search(c)), None)
        if bad is not None:
            header = Row(dict.fromkeys(columns, ""), (str(path), 0, lines.end, 1))
            raise not_utf8_error(str(path), None, bad, header)
        n, start, line = 0, lines.end, reader.line_num + 1
        for n, row in enumerate(reader, start=1):
            at, start, line = (str(path), start, lines.end, line), lines.end, reader.line_num + 1
            extra, short = row.pop(None, None), [c for c in columns if row.get(c) is None]
            if extra or short:
                got = len(columns) + len(extra or []) - len(short)
                problem = f"{got} values for the {len(columns)} columns {list(columns)}" + (
                    " (an unquoted delimiter inside a value?)" if extra else ""
                )
                field_name = short[0] if short else None
                yield n, BadRecordError(str(path), n, field_name, problem, kind="column_count")
                continue
            undecodable = any(_UNDECODABLE.search(v) for v in row.values())
            yield n, Row(row, at, keyed=False) if undecodable else row
    if n == 0:
        raise BadRecordError(str(path), None, None, "no data rows under the header", "empty_file")


def _read_parquet(path: Path) -> Iterator[tuple[int, dict | BadRecordError]]:
    import pyarrow.parquet as pq

    yield from arrow_rows(pq.read_table(path), str(path))


def arrow_rows(table: Any, file: str, n: int = 0) -> Iterator[tuple[int, dict | BadRecordError]]:
    """Rows of a ``pyarrow.Table``, numbered from ``n + 1``; a row whose strings are not UTF-8
    (writers that do not check) is a ``not_utf8`` error naming its column, not a crash."""
    for batch in table.to_batches(max_chunksize=4096):
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            rows = [_arrow_row(batch.slice(r, 1), file, n + r + 1) for r in range(batch.num_rows)]
        for row in rows:
            n += 1
            yield n, row


def _arrow_row(one: Any, file: str, row_no: int) -> dict | BadRecordError:
    """The only row of a one-row ``pyarrow`` table or batch, or the error of its first bad column."""
    row = {}
    for name, column in zip(one.schema.names, one.columns, strict=True):
        try:
            row[name] = column[0].as_py()
        except UnicodeDecodeError as exc:
            byte = exc.object[exc.start]
            problem = f"not valid UTF-8 (byte 0x{byte:02x} at byte {exc.start} of the value)"
            return BadRecordError(file, row_no, name, problem, "not_utf8")
    return row


def _read_pubmedqa(path: Path, split: str = "train", test_file: str = "test_ground_truth.json"):
    """PubMedQA PQA-L: ``ori_pqal.json`` (PMID -> record); the official test = keys of ``test_file``."""
    test_ids = set(json.loads((path.parent / test_file).read_text()))
    for i, rec in _read_json(path):
        if isinstance(rec, BadRecordError):
            yield i, rec
            continue
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
        if isinstance(rec, BadRecordError):
            yield i, rec
            continue
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
    for i, ctx in _read_json(path):
        if isinstance(ctx, BadRecordError):
            yield i, ctx
            continue
        try:
            table = "\n".join(" | ".join(str(c) for c in row) for row in ctx["table"]["table"])
            paras = "\n".join(
                p["text"] for p in sorted(ctx["paragraphs"], key=lambda p: p["order"])
            )
            questions = list(ctx["questions"])
        except (KeyError, TypeError) as exc:
            problem = f"not a TAT-QA context (missing {exc})"
            yield i, BadRecordError(str(path), i, None, problem, kind="missing_field")
            continue
        for q in questions:
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
                    "question": q.get("question"),
                    "answer": ans,
                    "uid": q.get("uid"),
                },
            )


READERS: dict[str, Callable[..., Iterator[tuple[int, dict | BadRecordError]]]] = {
    "jsonl": _iter_jsonl,
    "json": _read_json,
    "csv": lambda p: _read_delimited(p, ","),
    "tsv": lambda p: _read_delimited(p, "\t"),
    "parquet": _read_parquet,
    "pubmedqa": _read_pubmedqa,
    "fiqa_post": _read_fiqa_post,
    "tatqa": _read_tatqa,
}


def strict_rows(file: str, rows: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, dict]]:
    """Raise at the first bad row of a reader, or at a row holding bytes that are not UTF-8.

    For files whose every row must be good (evaluation sets, decontamination lists).
    """
    for i, row in rows:
        if isinstance(row, BadRecordError):
            raise row
        bad = undecodable_field(row)
        if bad is not None:
            raise not_utf8_error(file, i, bad, row)
        yield i, row


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """JSON Lines that must be valid throughout: the first bad line raises, naming file and row."""
    return strict_rows(str(path), _iter_jsonl(path))


def _infer_reader(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in READERS:
        # Several shared files are JSON Lines despite a .json extension (e.g. MedMCQA dev.json).
        if suffix == "json":
            with open(path, "rb") as fh:
                first = fh.readline().removeprefix(codecs.BOM_UTF8).strip()
            if first.startswith(b"{") and first.endswith(b"}"):
                return "jsonl"
        return suffix
    raise ValueError(f"{path}: cannot infer the file format from '{path.suffix}'; set `reader:`")


def _read_hub(source: Any) -> Iterator[tuple[int, dict]]:
    """Rows of a Hugging Face hub dataset (online users; needs network access)."""
    from datasets import load_dataset

    ds = load_dataset(
        cfg_get(source, "hub_id"),
        cfg_get(source, "hub_config"),
        split=cfg_get(source, "split", "train"),
    )
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def read_source(source: Any) -> tuple[str, Iterator[tuple[int, dict | BadRecordError]]]:
    """Open one configured source; returns ``(display_name, rows)``.

    A bad row arrives as a :class:`BadRecordError` in place of its dict (see :func:`strict_rows`).

    Raises:
        FileNotFoundError: the file does not exist (the message names the source and path).
    """
    if cfg_get(source, "hub_id") and not cfg_get(source, "path"):
        return str(cfg_get(source, "hub_id")), _read_hub(source)
    path = Path(str(cfg_get(source, "path")))
    if not path.exists():
        raise FileNotFoundError(
            f"data source '{cfg_get(source, 'name', path.stem)}': file not found: {path} "
            "(set paths.data_dir or GRADS_DATA_DIR)"
        )
    reader = cfg_get(source, "reader") or _infer_reader(path)
    if reader not in READERS:
        raise ValueError(
            f"data source '{cfg_get(source, 'name')}': unknown reader {reader!r}; "
            f"expected one of {sorted(READERS)}"
        )
    kwargs = dict(cfg_get(source, "reader_kwargs") or {})
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
        if _UNDECODABLE.search(v):
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
    """Read one source and render its rows into :class:`Record` objects.

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
    out: list[Record] = []
    bad: list[BadRecordError] = []
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
            bad.append(exc)
            skip_bad_row(exc, name, counts)
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
    if bad and not out:
        first = bad[0]
        raise BadRecordError(
            file,
            first.row,
            first.field,
            f"all {len(bad)} rows are bad (first: {first.problem}): the source does not match "
            "the file (check its prompt/response templates and fields)",
            "all_rows_bad",
        )
    if bad:
        kinds = dict(Counter(b.kind for b in bad))
        log.warning("data: %s: skipped %d bad rows %s", name, len(bad), kinds)
    return out


def _eval_texts(spec: Any) -> set[str]:
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
        if _UNDECODABLE.search(value):
            raise not_utf8_error(file, row_no, field_name, row)
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
    specs = list(cfg_get(domain, "decontaminate") or [])
    if not specs:
        return records
    eval_texts: set[str] = set()
    heldout: dict[str, float] = {}
    for spec in specs:
        if cfg_get(spec, "heldout_source"):
            heldout[str(cfg_get(spec, "heldout_source"))] = float(cfg_get(spec, "frac", 0.1))
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


def _data_settings(data_cfg: Any) -> dict:
    """``data_cfg`` over the ``data`` defaults of conf/config.yaml (the one place they live)."""
    from grads.config import defaults

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
    from grads.heldout import exclude_heldout  # the held-out split never enters any pool

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
    if rec.meta.get("messages"):  # multi-turn (grads.custom_pool): the last turn is supervised
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
    from grads import synthetic

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
