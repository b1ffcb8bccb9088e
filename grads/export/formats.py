"""The forms the subset is written in (``export.format``): one name or a list of them.

=============  ===========================================================================
``jsonl``      ``selected.jsonl``: the original records plus ``id``/``score``/``rank``
               (always written: it is the export's record of the subset)
``datasets``   ``selected/``: the same rows as a ``datasets`` folder (``save_to_disk``)
``trl``        ``trl.jsonl`` and ``trl/``: TRL's *prompt-completion* type in the
               *conversational* format, ``{"prompt": [turns], "completion": [turn]}``
``messages``   ``messages.jsonl`` and ``messages/``: ``{"messages": [turns]}``, TRL's
               conversational language-modelling type
=============  ===========================================================================

Both TRL forms hold the chat turns the pipeline trained on (:func:`grads.data.pool.messages_of` of the
records :func:`grads.data.pool.load_records` builds: the same template resolution, system prompt and
chat turns as the warm-up and the features stage). ``trl`` is the one that trains like the
pipeline: TRL's ``SFTTrainer`` applies the model's chat template to conversational records and,
for a prompt-completion dataset, computes the loss on the completion only (its default), which is
the pipeline's prompt masking; for a multi-turn chat the completion is the last assistant turn,
the one the pipeline supervises and GrADS scores. ``messages`` keeps the whole conversation in one
field; ``SFTTrainer`` then trains on every token unless asked otherwise (``assistant_only_loss``).
Rows are in ``selected.jsonl`` order (best first) and carry only the fields TRL reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grads.io import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "datasets", "trl", "messages")
DEFAULT_FORMATS = ("jsonl", "datasets")


def parse_formats(value: Any) -> tuple[str, ...]:
    """``export.format`` as a tuple of names (``jsonl`` always included; ``None``: the default).

    Raises:
        ValueError: a name not in :data:`FORMATS`, or a value that is neither a name nor a list.
    """
    if value is None:
        return DEFAULT_FORMATS
    problem = format_problem(value)
    if problem:
        raise ValueError(f"export.format={value!r}: {problem}")
    names = [value] if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(["jsonl", *names]))


def format_problem(value: Any) -> str | None:
    """What is wrong with an ``export.format`` value (``None`` when it is valid)."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        return f"expected a name or a list of names from {list(FORMATS)}"
    bad = [n for n in names if n not in FORMATS]
    return f"unknown {bad}; choose from {list(FORMATS)}" if bad else None


def trl_record(messages: list[dict]) -> dict:
    """TRL prompt-completion (conversational): every turn before the supervised one, and it."""
    return {"prompt": [dict(t) for t in messages[:-1]], "completion": [dict(messages[-1])]}


def messages_record(messages: list[dict]) -> dict:
    """TRL conversational language modelling: the whole conversation."""
    return {"messages": [dict(t) for t in messages]}


def write_trainer_formats(
    formats: Sequence[str], records: Sequence[Any], out_dir: Path
) -> dict[str, dict[str, str]]:
    """Write the ``trl`` / ``messages`` forms of ``records`` (best first) that ``formats`` asks for.

    Returns:
        ``{format: {"jsonl": path, "dataset": path}}`` of what was written.
    """
    from grads.data.pool import messages_of
    from grads.io import write_jsonl

    build = {"trl": trl_record, "messages": messages_record}
    out = {}
    for name in formats:
        if name not in build:
            continue
        rows = [build[name](messages_of(r)) for r in records]
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        save_dataset(rows, out_dir / name)
        out[name] = {"jsonl": str(out_dir / f"{name}.jsonl"), "dataset": str(out_dir / name)}
    return out


def save_dataset(rows: list[dict], path: str | Path) -> list[str]:
    """``Dataset.save_to_disk`` of ``rows`` (atomically); returns the column names.

    Columns are the union of the rows' keys (a key missing from a row is null there). A column whose
    values Arrow cannot hold in one type (e.g. numbers in some rows, text in others) is stored as
    JSON text, with a warning naming it.
    """
    import pyarrow as pa
    from datasets import Dataset

    columns = list(dict.fromkeys(k for r in rows for k in r))
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            log.warning("export: column %r has mixed types; stored as JSON text in %s", col, path)
            arrays[col] = pa.array(
                [v if isinstance(v, str) or v is None else json.dumps(v) for v in values]
            )
    table = pa.table(arrays) if arrays else pa.table({"id": pa.array([], pa.string())})
    with atomic_path(path) as tmp:
        Dataset(table).save_to_disk(str(tmp))
    return columns
