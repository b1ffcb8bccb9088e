"""Bring your own pool: the ``custom`` domain, read from a path given on the command line.

::

    grads domain=custom domain.path=pool.jsonl "domain.prompt='{instruction}\\n{input}'" \\
          domain.response=output

(the inner single quotes are Hydra's: a value with braces must be quoted).

``domain.path`` is a file (JSON Lines, JSON, CSV, TSV, parquet), a folder of such shards (read in
sorted path order) or a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset``,
or a ``DatasetDict`` whose split ``domain.split`` picks). Each record becomes one SFT sample:

* **templates**: ``domain.prompt`` / ``domain.response`` are ``str.format`` templates over the
  record's fields (``'{instruction}\\n{input}'``, where a typed ``\\n`` is a newline); a bare name
  without braces (``instruction``) means that field alone. Fields in ``domain.optional_fields`` may
  be empty or absent (Alpaca's ``input``); a prompt or response that renders empty is a bad row.
* **chat**: a ``messages`` list of ``{"role", "content"}`` turns (ShareGPT's ``{"from", "value"}``
  with ``human``/``gpt`` roles is accepted too), taken as it is. The last turn must be the
  assistant's: it is the supervised response and every earlier turn is its (masked) context, the
  one-sample-one-response unit that GrADS scores.

With neither set (``domain.mode: auto``) a ``messages`` (or ``conversations``) field selects chat,
else the first common field pair found (``instruction``/``output``, ``prompt``/``response``, ...).

Errors follow :mod:`grads.data.pool`: a bad row raises :class:`grads.data.readers.BadRecordError` naming the
file, row and field (``data.on_bad_row=skip`` counts and logs them instead), and a missing field
names the fields the file has. The resulting :class:`grads.data.records.Record` objects join the usual
pipeline (dedup, ``pool_limit``, chat template, prompt masking) through the source's ``builder``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grads.config_access import cfg_get
from grads.data.readers import (
    READERS,
    BadRecordError,
    arrow_rows,
    infer_reader,
    not_utf8_error,
    undecodable_field,
)
from grads.data.records import Record, sample_id, skip_bad_row

log = logging.getLogger(__name__)

FILE_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")
FORMATS = ("auto", *FILE_FORMATS, "datasets")
MODES = ("auto", "template", "chat")
# Field pairs tried, in order, when neither templates nor a messages field are given.
CONVENTIONS: tuple[tuple[str, str], ...] = (
    ("{instruction}\n{input}", "{output}"),  # Alpaca
    ("{instruction}", "{output}"),
    ("{instruction}", "{response}"),  # Dolly
    ("{prompt}", "{response}"),
    ("{prompt}", "{completion}"),  # OpenAI fine-tuning files
    ("{question}", "{answer}"),
    ("{input}", "{output}"),
)
CHAT_FIELDS = ("messages", "conversations")
# Accepted roles and their chat-template names (ShareGPT's human/gpt included).
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
_FORMATTER = string.Formatter()


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    )


def pool_files(path: str | Path | None, fmt: str = "auto") -> list[tuple[Path, str]]:
    """The files of a pool path with the reader of each: ``[(file, format), ...]``.

    Raises:
        ValueError: no path, an unknown format, or a folder without data files.
        FileNotFoundError: the path does not exist.
    """
    if path in (None, "", "None"):
        raise ValueError(
            "domain=custom needs a pool: set domain.path=<file or folder> "
            "(JSON Lines, CSV, parquet, a folder of shards, or a save_to_disk folder)"
        )
    fmt = str(fmt or "auto")
    if fmt not in FORMATS:
        raise ValueError(f"domain.format={fmt!r}: expected one of {list(FORMATS)}")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"domain.path: {p} does not exist (cwd: {Path.cwd()})")
    if fmt == "datasets" or is_saved_dataset(p):
        if not is_saved_dataset(p):
            raise ValueError(f"domain.format=datasets: {p} is not a save_to_disk folder")
        return [(p, "datasets")]
    if p.is_file():
        return [(p, infer_reader(p) if fmt == "auto" else fmt)]
    exts = FILE_FORMATS if fmt == "auto" else (fmt,)
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file()
        and f.suffix.lower().lstrip(".") in exts
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise ValueError(
            f"domain.path: the folder {p} has no data files ({', '.join('.' + e for e in exts)})"
        )
    return [(f, infer_reader(f) if fmt == "auto" else fmt) for f in files]


def _read_saved(path: Path, split: str | None) -> tuple[str, Iterator[tuple[int, dict]]]:
    """Rows of a ``save_to_disk`` folder; a ``DatasetDict`` needs (or defaults to) a split."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    where = str(path)
    if isinstance(ds, DatasetDict):
        splits = list(ds)
        name = split or ("train" if "train" in ds else splits[0] if len(splits) == 1 else None)
        if name not in ds:
            raise ValueError(
                f"domain.path: {path} holds splits {splits}; choose one with domain.split=NAME"
            )
        ds, where = ds[name], f"{path}[{name}]"
    elif split:
        raise ValueError(f"domain.split={split!r}: {path} holds a single Dataset, not splits")
    return where, _dataset_rows(ds, where)


def _dataset_rows(ds: Any, where: str) -> Iterator[tuple[int, dict | BadRecordError]]:
    """Rows of a ``Dataset``; from a row whose strings are not UTF-8 on, row by row, so that the
    row is a ``not_utf8`` error naming its column (:func:`grads.data.readers.arrow_rows`)."""
    n = 0
    try:
        for row in ds:
            n += 1
            yield n, dict(row)
        return
    except UnicodeDecodeError:
        pass
    arrow = ds.with_format("arrow")
    for i in range(n, len(ds)):
        try:
            row = dict(ds[i])
        except UnicodeDecodeError:
            row = next(arrow_rows(arrow[i : i + 1], where, i))[1]
        yield i + 1, row


def iter_rows(source: Any) -> Iterator[tuple[str, int, dict]]:
    """Every row of a custom pool as ``(file, row_number, row)``; rows are 1-based per file."""
    for path, fmt in pool_files(cfg_get(source, "path"), cfg_get(source, "format", "auto")):
        if fmt == "datasets":
            where, rows = _read_saved(path, cfg_get(source, "split"))
        else:
            where, rows = str(path), READERS[fmt](path)
        for row_no, row in rows:
            yield where, row_no, row


def fingerprint(path: str | Path | None, fmt: str = "auto") -> str:
    """Content hash of a pool's files (names relative to the path, sizes and bytes).

    The stage cache keys on it, so editing a pool in place re-runs warm-up and selection instead of
    reusing a selection made from the old content.
    """
    root = Path(str(path)).expanduser()
    h = hashlib.sha1()
    files = pool_files(path, fmt)
    if files[0][1] == "datasets":
        files = [(f, "") for f in sorted(root.rglob("*")) if f.is_file()]
    for f, _ in files:
        rel = f.relative_to(root).as_posix() if f != root else f.name
        h.update(f"{rel}\x00{f.stat().st_size}\x00".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Rows -> records
# --------------------------------------------------------------------------------------------------
@dataclass
class PoolSpec:
    """How rows become samples: templates (``prompt``/``response``) or chat (``messages_field``)."""

    mode: str
    prompt: str | None = None
    response: str | None = None
    messages_field: str | None = None
    optional: set[str] = field(default_factory=set)

    @property
    def fields(self) -> list[str]:
        if self.mode == "chat":
            return [str(self.messages_field)]
        return list(dict.fromkeys(_fields(self.prompt) + _fields(self.response)))


def _as_template(value: Any, key: str) -> str | None:
    """A template string; a bare field name (no braces) stands for ``{name}``."""
    if value is None:
        return None
    # A command line cannot carry a newline: `\n` and `\t` typed there mean newline and tab.
    text = str(value).replace("\\n", "\n").replace("\\t", "\t")
    if "{" not in text and "}" not in text:
        return "{" + text.strip() + "}"
    try:
        names = [(lit, name) for lit, name, _, _ in _FORMATTER.parse(text)]
    except ValueError as exc:
        raise ValueError(f"domain.{key}={text!r}: not a valid template ({exc})") from exc
    for _, name in names:
        if name is not None and (not name or "." in name or "[" in name or name.isdigit()):
            raise ValueError(
                f"domain.{key}={text!r}: use named fields such as {{instruction}} "
                f"(got {{{name}}}); write {{{{ and }}}} for literal braces"
            )
    return text


def check_source(source: Any) -> list[str]:
    """The custom source's knobs, checked before anything is read (``grads.config`` calls it).

    Templates are optional: left null (``domain.mode=auto``), chat turns or a known field pair are
    detected from the pool's first row. Returns one problem per bad knob, naming the ``domain.*``
    key the user sets.
    """
    problems = []
    for key, allowed in (("mode", MODES), ("format", FORMATS)):
        value = cfg_get(source, key, "auto")
        if value not in allowed:
            problems.append(f"domain.{key}={value!r}: expected one of {list(allowed)}")
    given = {}
    for key in ("prompt", "response"):
        value = cfg_get(source, key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"domain.{key}={value!r}: expected a template string or null")
            continue
        try:
            given[key] = _as_template(value, key)
        except ValueError as exc:
            problems.append(str(exc))
    if len(given) == 2 and (given["prompt"] is None) != (given["response"] is None):
        problems.append(
            "domain.prompt / domain.response: set both (templates) or neither (detected from "
            "the pool's fields, or chat records)"
        )
    chat_field = cfg_get(source, "messages_field")
    if chat_field is not None and (not isinstance(chat_field, str) or not chat_field.strip()):
        problems.append(f"domain.messages_field={chat_field!r}: expected a field name or null")
    optional = cfg_get(source, "optional_fields", [])
    if not isinstance(optional, list | tuple) or not all(isinstance(f, str) for f in optional):
        problems.append(f"domain.optional_fields={optional!r}: expected a list of field names")
    return problems


def _fields(template: str | None) -> list[str]:
    return [name for _, name, _, _ in _FORMATTER.parse(template or "") if name]


def resolve_spec(source: Any, first_row: dict, file: str) -> PoolSpec:
    """Decide template or chat mode from the config and the pool's first row.

    Raises:
        ValueError: an unknown mode, a half-given template pair, or ``auto`` with no known layout
            (the message names the fields the file has).
    """
    mode = str(cfg_get(source, "mode", "auto"))
    if mode not in MODES:
        raise ValueError(f"domain.mode={mode!r}: expected one of {list(MODES)}")
    prompt = _as_template(cfg_get(source, "prompt"), "prompt")
    response = _as_template(cfg_get(source, "response"), "response")
    optional = {str(f) for f in (cfg_get(source, "optional_fields") or [])}
    chat_field = cfg_get(source, "messages_field")
    if (prompt is None) != (response is None):
        raise ValueError("set both domain.prompt and domain.response (or neither, for auto/chat)")
    if prompt is not None and mode != "chat":
        return PoolSpec("template", prompt, response, optional=optional)
    have = sorted(k for k in first_row if not str(k).startswith("_"))
    candidates = [chat_field] if chat_field else list(CHAT_FIELDS)
    if mode == "chat":
        return PoolSpec(
            "chat", messages_field=chat_field or _first_in(candidates, have, "messages")
        )
    found = _first_in(candidates, have, None) if mode == "auto" else None
    if found:
        return PoolSpec("chat", messages_field=found)
    for p, r in CONVENTIONS:
        if set(_fields(p) + _fields(r)) <= set(have):
            log.info("custom pool: prompt=%r response=%r (detected from the fields)", p, r)
            return PoolSpec("template", p, r, optional=optional)
    raise ValueError(
        f"{file}: cannot tell which fields hold the prompt and the response; the file has fields "
        f"{have}. Set domain.prompt='{{field}}...' and domain.response='{{field}}', or give "
        f"multi-turn records a 'messages' field of {{role, content}} turns"
    )


def _first_in(candidates: list[str], have: list[str], default: str | None) -> str | None:
    return next((c for c in candidates if c in have), default)


def _missing(file: str, row_no: int, row: dict, name: str) -> BadRecordError:
    have = sorted(str(k) for k in row if not str(k).startswith("_"))
    return BadRecordError(
        file,
        row_no,
        name,
        f"missing field; the file has fields {have} (set domain.prompt / "
        "domain.response to templates over these)",
        "missing_field",
    )


def _text(file: str, row_no: int, name: str, value: Any, optional: bool = False) -> str:
    """A field's value as stripped text, with :mod:`grads.data.pool`'s rules (numbers become strings)."""
    if value is None and optional:
        return ""
    if isinstance(value, bool) or value is None or not isinstance(value, str | int | float):
        problem = f"expected a string, got {type(value).__name__}"
        raise BadRecordError(file, row_no, name, problem, "wrong_type")
    text = str(value).strip()
    if not text and not optional:
        raise BadRecordError(file, row_no, name, "empty string", "empty_field")
    return text


def _template_record(spec: PoolSpec, file: str, row_no: int, row: dict, system: str | None):
    values = {}
    for name in spec.fields:
        if name not in row and name not in spec.optional:
            raise _missing(file, row_no, row, name)
        values[name] = _text(file, row_no, name, row.get(name), name in spec.optional)
    prompt = str(spec.prompt).format(**values).strip()
    response = str(spec.response).format(**values).strip()
    for side, text in (("prompt", prompt), ("response", response)):
        if not text:
            problem = f"the {side} template renders empty"
            raise BadRecordError(file, row_no, None, problem, "empty_render")
    return Record(
        id=sample_id(prompt, response, system),
        source="custom",
        prompt=prompt,
        response=response,
        system=system,
        meta={"file": file, "row": row_no, "key_text": None},
    )


def chat_turns(file: str, row_no: int, name: str, value: Any) -> tuple[str | None, list[dict]]:
    """Validate a ``messages`` list; returns ``(system text or None, user/assistant turns)``.

    Raises:
        BadRecordError: not a list of turns, an unknown role, an empty content, a system turn after
            the first, no user turn, or a last turn that is not the assistant's.
    """
    if hasattr(value, "tolist"):  # numpy arrays from some parquet readers
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise BadRecordError(
            file,
            row_no,
            name,
            f"expected a non-empty list of turns, got {type(value).__name__}",
            "wrong_type",
        )
    system, turns = None, []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecordError(
                file, row_no, where, f"expected an object, got {type(turn).__name__}", "wrong_type"
            )
        role_raw = turn.get("role", turn.get("from"))
        role = ROLES.get(str(role_raw).lower()) if role_raw is not None else None
        if role is None:
            raise BadRecordError(
                file,
                row_no,
                f"{where}.role",
                f"unknown role {role_raw!r}; expected one of {list(ROLES)}",
                "unknown_role",
            )
        content = _text(file, row_no, f"{where}.content", turn.get("content", turn.get("value")))
        if role == "system":
            if i:
                problem = "a system turn is only allowed first"
                raise BadRecordError(file, row_no, where, problem, "bad_turn_order")
            system = content
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "assistant":
        problem = "the last turn must be the assistant's (the supervised response)"
        raise BadRecordError(file, row_no, name, problem, "bad_turn_order")
    if not any(t["role"] == "user" for t in turns):
        problem = "no user turn before the assistant's"
        raise BadRecordError(file, row_no, name, problem, "bad_turn_order")
    return system, turns


def _chat_record(spec: PoolSpec, file: str, row_no: int, row: dict, system: str | None):
    name = str(spec.messages_field)
    if name not in row:
        raise _missing(file, row_no, row, name)
    own_system, turns = chat_turns(file, row_no, name, row[name])
    system = own_system or system  # the record's own system turn wins over data.system_prompt
    context = "\n".join(f"{t['role']}: {t['content']}" for t in turns[:-1])
    response = turns[-1]["content"]
    return Record(
        id=sample_id(context, response, system),
        source="custom",
        prompt=context,
        response=response,
        system=system,
        # grads.data.pool.messages_of renders these turns as they are (the last one is supervised).
        meta={"file": file, "row": row_no, "key_text": None, "messages": turns},
    )


def iter_records(
    source: Any, system: str | None = None
) -> Iterator[tuple[dict, Record | BadRecordError]]:
    """``(row, record)`` for every row of the pool, or ``(row, error)`` for a bad one."""
    spec = None
    for file, row_no, row in iter_rows(source):
        if isinstance(row, BadRecordError):  # the reader already named the problem
            yield row, row
            continue
        if not isinstance(row, dict):
            problem = f"expected an object, got {type(row).__name__}"
            yield row, BadRecordError(file, row_no, None, problem, "not_an_object")
            continue
        undecodable = undecodable_field(row)
        if undecodable is not None:  # the row travels to the export whole: every field counts
            yield row, not_utf8_error(file, row_no, undecodable, row)
            continue
        spec = spec or resolve_spec(source, row, file)
        build = _chat_record if spec.mode == "chat" else _template_record
        try:
            yield row, build(spec, file, row_no, row, system)
        except BadRecordError as exc:
            yield row, exc


def records_from_custom(
    source: Any, on_bad_row: str = "error", system: str | None = None, counts: Counter | None = None
) -> list[Record]:
    """Every record of the custom pool as a list (:func:`iter_custom_records`, read to the end)."""
    return list(iter_custom_records(source, on_bad_row, system, counts))


def iter_custom_records(
    source: Any, on_bad_row: str = "error", system: str | None = None, counts: Counter | None = None
) -> Iterator[Record]:
    """The ``builder`` of the custom domain's source, one record at a time: same contract as
    :func:`grads.data.records.iter_source_records` (``on_bad_row`` = ``error`` raises the first
    :class:`~grads.data.readers.BadRecordError`, ``skip`` counts ``<name>:bad_row`` and
    ``<name>:bad_row:<kind>`` and logs the first few, :func:`grads.data.records.skip_bad_row`)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row={on_bad_row!r}: expected 'error' or 'skip'")
    counts = counts if counts is not None else Counter()
    name = str(cfg_get(source, "name", "custom"))
    for _, rec in iter_records(source, system):
        if isinstance(rec, BadRecordError):
            if on_bad_row == "error":
                raise rec
            skip_bad_row(rec, name, counts)
            continue
        rec.source = name
        yield rec


def selected_rows(source: Any, ids: list[str], system: str | None = None) -> dict[str, dict]:
    """The original rows of the given sample ids (first occurrence, as de-duplication keeps)."""
    want, found = set(ids), {}
    for row, rec in iter_records(source, system):
        if isinstance(rec, Record) and rec.id in want and rec.id not in found:
            found[rec.id] = row
    return found


def describe(source: Any) -> dict:
    """What the pool looks like: files, first row's fields and the resolved mode (for logs/export)."""
    files = pool_files(cfg_get(source, "path"), cfg_get(source, "format", "auto"))
    first = next(iter_rows(source), None)
    spec = resolve_spec(source, first[2], first[0]) if first else None
    return {
        "path": str(cfg_get(source, "path")),
        "files": [str(f) for f, _ in files],
        "format": files[0][1],
        "fields": sorted(first[2]) if first else [],
        "mode": spec.mode if spec else None,
        "prompt": spec.prompt if spec else None,
        "response": spec.response if spec else None,
        "messages_field": spec.messages_field if spec else None,
    }


def to_jsonable(row: dict) -> dict:
    """A row with values JSON can hold (dates, bytes and numpy values as text or lists)."""
    return json.loads(json.dumps(row, default=_default))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return str(obj)
