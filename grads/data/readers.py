"""Readers of a domain's source files (or hub datasets): rows as flat dicts, a bad row as a
:class:`BadRecordError` naming file, row and field (the lowest level of the data layer).

Each reader yields ``(row_number, flat dict | BadRecordError)``. Row numbers are 1-based data rows
(JSONL: the line). A bad row is yielded, not raised, so that ``data.on_bad_row=skip`` can count it
and go on; problems with the whole file (empty, not parseable at all) raise. Bytes that are not
UTF-8 never raise a bare ``UnicodeDecodeError``: the row is bad, with the byte named.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grads.config_access import cfg_get
from grads.errors import UserError

# Lone surrogates: where bytes that are not UTF-8 end up after decoding with "surrogateescape"
# (U+DC80..U+DCFF), or a JSON escape such as "\\ud800" put them; neither can be encoded as text.
UNDECODABLE = re.compile("[\ud800-\udfff]")


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
    return len(UNDECODABLE.findall(text))


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
    m = UNDECODABLE.search(str(field_name)) or UNDECODABLE.search(value)
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
        if UNDECODABLE.search(str(key)) or (
            isinstance(value, str | dict | list) and UNDECODABLE.search(_text(value))
        ):
            return str(key)
    return None


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
                if UNDECODABLE.search(line):
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
            yield i, Row(obj, (str(path), start, pos, i)) if UNDECODABLE.search(line) else obj
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
    spans = _json_spans(path, text, len(items)) if UNDECODABLE.search(text) else None
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
        bad = next((c for c in columns if UNDECODABLE.search(c)), None)
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
            undecodable = any(UNDECODABLE.search(v) for v in row.values())
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


def read_jsonl_strict(path: Path) -> Iterator[tuple[int, dict]]:
    """JSON Lines that must be valid throughout: the first bad line raises, naming file and row."""
    return strict_rows(str(path), _iter_jsonl(path))


def infer_reader(path: Path) -> str:
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
    reader = cfg_get(source, "reader") or infer_reader(path)
    if reader not in READERS:
        raise ValueError(
            f"data source '{cfg_get(source, 'name')}': unknown reader {reader!r}; "
            f"expected one of {sorted(READERS)}"
        )
    kwargs = dict(cfg_get(source, "reader_kwargs") or {})
    return str(path), READERS[reader](path, **kwargs)
