"""Offline dataset loaders for the ``grads_*`` lm-eval tasks (``custom_dataset`` callables).

Every task YAML in this folder names one loader here with ``custom_dataset: !function
grads.evaluation.tasks.utils.<loader>`` and passes file paths *relative to the data root* in
``dataset_kwargs``. The data root itself is never written in a YAML: lm-eval calls the loader with
``**metadata, **dataset_kwargs`` and the runner puts ``data_dir`` (= ``cfg.paths.data_dir``) into the
``TaskManager`` metadata. From the command line the same YAMLs work with::

    lm_eval --model hf --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct \
        --include_path grads/evaluation/tasks --tasks grads_medical \
        --metadata '{"data_dir": "../shared/data"}'

(``GRADS_DATA_DIR`` is the fallback when no ``data_dir`` is passed.)

Conventions shared by all loaders:

* The evaluation split is called ``test`` and is **shuffled with a fixed seed** (``shuffle_seed``,
  default 1234), so that lm-eval's ``limit=N`` (which takes the first N documents) is a uniform
  random sample instead of, e.g., the first N rows of a file sorted by label.
* Few-shot splits (MMLU ``dev``, LegalBench ``train``, PubMedQA's non-test half, the non-held-out
  CUAD clauses) keep their file order (MMLU's ``first_n`` sampler relies on it).
* Every document carries an integer ``gold`` (0-based index into the task's choices) computed here;
  a label outside the task's label set raises :class:`TaskDataError` naming the file and row, instead
  of being scored silently as wrong (lm-eval maps unknown labels to -100).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_SHUFFLE_SEED = 1234


class TaskDataError(ValueError):
    """An evaluation data file that is missing or has a malformed row (message names file and row)."""


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: the ``data_dir`` metadata, else ``$GRADS_DATA_DIR``.

    Raises:
        TaskDataError: if neither is set.
    """
    root = data_dir or os.environ.get("GRADS_DATA_DIR")
    if not root:
        raise TaskDataError(
            "no data root: pass metadata={'data_dir': ...} to the TaskManager (the grads runner does "
            "this from cfg.paths.data_dir) or set GRADS_DATA_DIR"
        )
    return Path(str(root)).expanduser()


def resolve(root: Path, rel: str | os.PathLike) -> Path:
    """``root / rel`` (absolute ``rel`` kept), raising :class:`TaskDataError` if it does not exist."""
    path = Path(str(rel)).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise TaskDataError(f"data file not found: {path}")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    """JSON Lines via the data module's reader; a bad line becomes a TaskDataError naming file and row."""
    from grads.data import BadRecordError
    from grads.data import _read_jsonl as read_rows

    try:
        return [row for _, row in read_rows(path)]
    except BadRecordError as exc:
        raise TaskDataError(str(exc)) from exc


def _read_delimited(path: Path, delimiter: str) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def _need(row: dict, keys: Iterable[str], path: Path, row_no: int) -> None:
    missing = [k for k in keys if row.get(k) in (None, "")]
    if missing:
        raise TaskDataError(f"{path}, row {row_no}: missing field(s) {missing}")


def _label_index(value: Any, labels: Sequence[str], path: Path, row_no: int) -> int:
    """Index of ``value`` in ``labels`` (case-insensitive, stripped)."""
    norm = [str(x).strip().lower() for x in labels]
    key = str(value).strip().lower()
    if key not in norm:
        raise TaskDataError(f"{path}, row {row_no}: label {value!r} is not one of {list(labels)}")
    return norm.index(key)


def shuffled(rows: list[dict], seed: int | None) -> list[dict]:
    """A deterministic permutation of ``rows`` (identity when ``seed`` is None)."""
    if seed is None:
        return list(rows)
    order = list(range(len(rows)))
    random.Random(int(seed)).shuffle(order)
    return [rows[i] for i in order]


def _dataset_dict(splits: dict[str, list[dict]], source: Path):
    """Build a ``datasets.DatasetDict`` (in memory: no HF cache, works offline)."""
    import datasets

    out = {}
    for name, rows in splits.items():
        if name == "test" and not rows:
            raise TaskDataError(f"{source}: no evaluation rows")
        out[name] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------------
# Loaders (``custom_dataset``). Unknown keyword arguments (lm-eval metadata) are ignored.
# --------------------------------------------------------------------------------------------------
def load_pubmedqa(
    data_dir: str | None = None,
    path: str = "medical/pubmedqa/ori_pqal.json",
    test_ids: str = "medical/pubmedqa/test_ground_truth.json",
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """PubMedQA PQA-L: ``test`` = the 500 official test PMIDs, ``train`` = the other 500 (few-shot).

    Docs: ``{pmid, question, context (abstract sections joined by newlines), label, gold}``.
    """
    root = data_root(data_dir)
    src, ids_file = resolve(root, path), resolve(root, test_ids)
    records = json.loads(src.read_text(encoding="utf-8"))
    truth = json.loads(ids_file.read_text(encoding="utf-8"))
    labels = ("yes", "no", "maybe")
    test, train = [], []
    for row_no, (pmid, rec) in enumerate(records.items(), start=1):
        _need(rec, ("QUESTION", "CONTEXTS", "final_decision"), src, row_no)
        label = truth.get(pmid, rec["final_decision"])
        doc = {
            "pmid": str(pmid),
            "question": rec["QUESTION"],
            "context": "\n".join(rec["CONTEXTS"]),
            "label": label,
            "gold": _label_index(label, labels, src, row_no),
        }
        (test if pmid in truth else train).append(doc)
    if len(test) != len(truth):
        raise TaskDataError(f"{ids_file}: {len(truth) - len(test)} test PMIDs missing from {src}")
    return _dataset_dict({"test": shuffled(test, shuffle_seed), "train": train}, src)


def load_bioasq_yesno(
    data_dir: str | None = None,
    path: str = "medical/bioasq/bioasq_7b_11b_golden.jsonl",
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """BioASQ 7b-11b golden yes/no questions (618). Docs: ``{id, question, label, gold}``."""
    src = resolve(data_root(data_dir), path)
    docs = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        if rec.get("type") != "yesno":
            continue
        _need(rec, ("question", "exact_answer"), src, row_no)
        label = str(rec["exact_answer"]).strip().lower()
        docs.append(
            {
                "id": str(rec.get("id", row_no)),
                "question": rec["question"],
                "label": label,
                "gold": _label_index(label, ("yes", "no"), src, row_no),
            }
        )
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


def load_medmcqa(
    data_dir: str | None = None,
    path: str = "medical/medmcqa/dev.json",
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """MedMCQA dev (JSON Lines; ``cop`` is 1-based). Docs: ``{id, question, choices[4], gold}``."""
    src = resolve(data_root(data_dir), path)
    docs = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("question", "opa", "opb", "opc", "opd", "cop"), src, row_no)
        cop = int(rec["cop"])
        if not 1 <= cop <= 4:
            raise TaskDataError(f"{src}, row {row_no}: cop={cop} is not in 1..4")
        docs.append(
            {
                "id": str(rec.get("id", row_no)),
                "question": rec["question"],
                "choices": [str(rec[k]) for k in ("opa", "opb", "opc", "opd")],
                "subject": rec.get("subject_name") or "",
                "gold": cop - 1,
            }
        )
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


def _mmlu_rows(src: Path) -> list[dict]:
    docs = []
    for row_no, rec in enumerate(_read_delimited(src, ","), start=1):
        _need(rec, ("question", "choice0", "choice1", "choice2", "choice3", "answer"), src, row_no)
        try:
            gold = int(rec["answer"])
        except ValueError as exc:
            raise TaskDataError(
                f"{src}, row {row_no}: answer {rec['answer']!r} is not 0..3"
            ) from exc
        if not 0 <= gold <= 3:
            raise TaskDataError(f"{src}, row {row_no}: answer {gold} is not 0..3")
        docs.append(
            {
                "question": rec["question"],
                "choices": [rec[f"choice{i}"] for i in range(4)],
                "gold": gold,
            }
        )
    return docs


def load_mmlu(
    subject: str,
    data_dir: str | None = None,
    test_dir: str = "general/mmlu/test",
    dev_dir: str = "general/mmlu/dev",
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """One MMLU subject: ``test`` (shuffled) and ``dev`` (5 few-shot rows, file order)."""
    root = data_root(data_dir)
    test_src = resolve(root, f"{test_dir}/{subject}_test.csv")
    dev_src = resolve(root, f"{dev_dir}/{subject}_dev.csv")
    return _dataset_dict(
        {"test": shuffled(_mmlu_rows(test_src), shuffle_seed), "dev": _mmlu_rows(dev_src)}, test_src
    )


def load_cuad_heldout(
    data_dir: str | None = None,
    path: str = "legal/legalbench_2023/cuad_clauses_all.jsonl",
    frac: float = 0.1,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """CUAD clause classification split by clause text with :func:`grads.data.is_heldout`.

    ``test`` = rows whose clause is held out (never trained on: the legal domain pool drops them),
    ``train`` = the other rows (few-shot source). Docs: ``{task, question, clause, label, gold}``.
    """
    from grads.data import is_heldout

    src = resolve(data_root(data_dir), path)
    test, train = [], []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("question", "clause", "label"), src, row_no)
        doc = {
            "task": rec.get("task", ""),
            "question": rec["question"],
            "clause": rec["clause"],
            "label": rec["label"],
            "gold": _label_index(rec["label"], ("No", "Yes"), src, row_no),
        }
        (test if is_heldout(rec["clause"], float(frac)) else train).append(doc)
    return _dataset_dict({"test": shuffled(test, shuffle_seed), "train": train}, src)


def load_legalbench(
    task: str,
    labels: Sequence[str],
    data_dir: str | None = None,
    root_dir: str = "legal/legalbench_2023/tasks",
    test_file: str = "test.tsv",
    train_file: str | None = "train.tsv",
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """A LegalBench (2023-03) label task from ``<task>/test.tsv`` (+ ``train.tsv`` for few-shot).

    Docs: ``{text, label, gold}`` with ``gold`` indexing ``labels`` (the YAML's ``doc_to_choice``).
    """
    root = data_root(data_dir)
    test_src = resolve(root, f"{root_dir}/{task}/{test_file}")

    def rows(src: Path) -> list[dict]:
        out = []
        for row_no, rec in enumerate(_read_delimited(src, "\t"), start=1):
            _need(rec, ("text", "label"), src, row_no)
            out.append(
                {
                    "text": rec["text"].strip(),
                    "label": rec["label"].strip(),
                    "gold": _label_index(rec["label"], labels, src, row_no),
                }
            )
        return out

    splits = {"test": shuffled(rows(test_src), shuffle_seed)}
    if train_file:
        splits["train"] = rows(resolve(root, f"{root_dir}/{task}/{train_file}"))
    return _dataset_dict(splits, test_src)


def load_finlora(
    path: str,
    labels: Sequence[str],
    data_dir: str | None = None,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """FinGPT/FinLoRA sentiment tests: ``{context: "Instruction: ...\\nInput: ...\\nAnswer: ", target}``.

    Docs: ``{prompt (context without the trailing space), label, gold}``.
    """
    src = resolve(data_root(data_dir), path)
    docs = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("context", "target"), src, row_no)
        docs.append(
            {
                "prompt": rec["context"].rstrip(),
                "label": rec["target"],
                "gold": _label_index(rec["target"], labels, src, row_no),
            }
        )
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


def load_choices_jsonl(
    path: str,
    data_dir: str | None = None,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """``{question, choices[list], label (0-based)}`` rows (ARC, closed-book BoolQ, Social IQa)."""
    src = resolve(data_root(data_dir), path)
    docs = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("question", "choices"), src, row_no)
        choices, gold = list(rec["choices"]), rec.get("label")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskDataError(f"{src}, row {row_no}: label {gold!r} is not an index into choices")
        docs.append(
            {"question": rec["question"], "choices": [str(c) for c in choices], "gold": gold}
        )
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


def load_hellaswag(
    data_dir: str | None = None,
    path: str = "general/hellaswag/hellaswag_val.jsonl",
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """HellaSwag val (llama.cpp text dump). Docs: ``{query, choices[4], gold}``.

    ``query`` = ``"<activity_label>: <ctx>"`` as in lm-eval's ``hellaswag`` preprocessing (the dump
    has no ``ctx_a``/``ctx_b`` split and its WikiHow tags are already stripped).
    """
    src = resolve(data_root(data_dir), path)
    docs = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("activity_label", "ctx", "endings"), src, row_no)
        endings, gold = [str(e).strip() for e in rec["endings"]], rec.get("label")
        if not isinstance(gold, int) or not 0 <= gold < len(endings):
            raise TaskDataError(f"{src}, row {row_no}: label {gold!r} is not an index into endings")
        docs.append(
            {
                "query": f"{rec['activity_label'].strip()}: {rec['ctx'].strip()}",
                "choices": endings,
                "gold": gold,
            }
        )
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


def load_mc_jsonl(
    path_key: str,
    data_dir: str | None = None,
    path: str | None = None,
    shuffle_seed: int | None = None,
    **metadata: Any,
):
    """Generated MC files (``grads.synthetic``): ``{id, question, choices[4], answer (0-based)}``.

    The file is given at run time in the metadata under ``path_key`` (the runner materialises the
    synthetic domain and passes ``synthetic_eval_mc`` / ``synthetic_probe``), or directly as
    ``path``. Not shuffled by default: the generator already shuffles.
    """
    where = metadata.get(path_key) or path
    if not where:
        raise TaskDataError(f"no file for {path_key!r}: pass metadata={{'{path_key}': <jsonl>}}")
    src = Path(str(where)).expanduser()
    if not src.is_absolute():
        src = data_root(data_dir) / src
    if not src.exists():
        raise TaskDataError(f"data file not found: {src}")
    docs = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("question", "choices"), src, row_no)
        choices, gold = rec["choices"], rec.get("answer")
        if not isinstance(choices, list) or len(choices) < 2:
            raise TaskDataError(f"{src}, row {row_no}: 'choices' must be a list of >= 2 strings")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskDataError(
                f"{src}, row {row_no}: answer {gold!r} is not an index into choices"
            )
        docs.append(
            {
                "id": str(rec.get("id", row_no)),
                "question": rec["question"],
                "choices": [str(c) for c in choices],
                "gold": gold,
            }
        )
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


# --------------------------------------------------------------------------------------------------
# Continuous (log-likelihood) tasks: held-out domain loss, reference answers, plain text
# --------------------------------------------------------------------------------------------------
def clip_head(text: str, max_chars: int | None) -> str:
    """The first ``max_chars`` characters of ``text``, cut back to a word boundary.

    Deterministic and tokenizer-independent, so every model scores the same text (bits per byte
    stay comparable across tokenizers). ``None`` or a text that fits: unchanged.
    """
    text = str(text).strip()
    if not max_chars or len(text) <= max_chars:
        return text
    cut = text[: int(max_chars)]
    space = cut.rfind(" ")
    # keep the cut inside the last word only when no boundary is in the last fifth
    return (cut[:space] if space > 0.8 * max_chars else cut).rstrip()


def clip_middle(text: str, max_chars: int | None, sep: str = " ... ") -> str:
    """Keep the start (60 %) and the end (40 %) of a long prompt, joined by ``sep``.

    Prompts carry their question at the end (e.g. PubMedQA: context, then the question), so the
    middle goes first, as ``grads.data.tokenize_record`` truncates training prompts.
    """
    text = str(text).strip()
    if not max_chars or len(text) <= max_chars:
        return text
    room = int(max_chars) - len(sep)
    head, tail = room * 3 // 5, room - room * 3 // 5
    return text[:head].rstrip() + sep + text[len(text) - tail :].lstrip()


def _prompt_docs(rows: list[dict], max_prompt_chars: int | None, max_response_chars: int | None):
    return [
        {
            **row,
            "prompt": clip_middle(row["prompt"], max_prompt_chars),
            "response": clip_head(row["response"], max_response_chars),
        }
        for row in rows
    ]


def load_heldout(
    path_key: str = "heldout_path",
    data_dir: str | None = None,
    max_prompt_chars: int | None = 400,
    max_response_chars: int | None = 400,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **metadata: Any,
):
    """The run's held-out domain split (``grads.heldout.materialise``) as prompt/response docs.

    The runner writes the split and passes its path as ``metadata["heldout_path"]``. Docs:
    ``{id, source, prompt, response}`` with the prompt cut in the middle and the response cut at
    the end to the configured number of characters.
    """
    where = metadata.get(path_key)
    if not where:
        raise TaskDataError(
            f"no held-out split: pass metadata={{'{path_key}': <jsonl>}} "
            "(the grads runner writes it with grads.heldout.materialise)"
        )
    src = Path(str(where)).expanduser()
    if not src.exists():
        raise TaskDataError(f"data file not found: {src}")
    rows = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("id", "prompt", "response"), src, row_no)
        rows.append(
            {
                "id": str(rec["id"]),
                "source": str(rec.get("source", "")),
                "prompt": rec["prompt"],
                "response": rec["response"],
            }
        )
    docs = _prompt_docs(rows, max_prompt_chars, max_response_chars)
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


def load_alpaca_ref(
    data_dir: str | None = None,
    path: str = "general/alpaca_eval/alpaca_eval.jsonl",
    max_prompt_chars: int | None = 400,
    max_response_chars: int | None = 400,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """AlpacaEval instructions with their GPT-4 Turbo reference answers (805), cut to size.

    Docs: ``{id, dataset, prompt (instruction), response (reference answer)}``.
    """
    src = resolve(data_root(data_dir), path)
    rows = []
    for row_no, rec in enumerate(_read_jsonl(src), start=1):
        _need(rec, ("instruction", "output"), src, row_no)
        rows.append(
            {
                "id": str(rec.get("id", row_no)),
                "dataset": str(rec.get("dataset", "")),
                "prompt": rec["instruction"],
                "response": rec["output"],
            }
        )
    docs = _prompt_docs(rows, max_prompt_chars, max_response_chars)
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


_WIKI_RULES = [
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" ; ", "; "),
    (" : ", ": "),
    (" , ", ", "),
    (" . ", ". "),
    (" 's ", "'s "),
    (" n't ", "n't "),
    (" 't ", "'t "),
    (" 're ", "'re "),
    (" 've ", "'ve "),
    (" 'll ", "'ll "),
    (" 'd ", "'d "),
    (" 'm ", "'m "),
    ("( ", "("),
    (" )", ")"),
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's word-level tokenisation where it is unambiguous (``<unk>`` stays).

    Joins number separators (``1 @,@ 000`` -> ``1,000``), punctuation and clitics to their word.
    """
    out = f" {text.strip()} "
    for old, new in _WIKI_RULES:
        out = out.replace(old, new)
    for mark in (" .", " ,", " ;", " :", " !", " ?"):
        if out.rstrip().endswith(mark):
            out = out.rstrip()[: -len(mark)] + mark.strip()
    return " ".join(out.split())


def load_wikitext(
    data_dir: str | None = None,
    path: str = "general/wikitext2/test.txt",
    min_chars: int = 200,
    max_chars: int | None = 600,
    detokenize: bool = True,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """WikiText-2 paragraphs (headings and short lines dropped), for rolling log-likelihood.

    Docs: ``{id (line number), text}``; ``text`` detokenised (see :func:`wikitext_detokenize`) and
    cut to ``max_chars`` at a word boundary.
    """
    src = resolve(data_root(data_dir), path)
    docs = []
    with open(src, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("=") or len(text) < min_chars:
                continue
            text = wikitext_detokenize(text) if detokenize else text
            docs.append({"id": str(line_no), "text": clip_head(text, max_chars)})
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, src)


def load_mmlu_cloze(
    subjects: Sequence[str],
    data_dir: str | None = None,
    test_dir: str = "general/mmlu/test",
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
    **_: Any,
):
    """MMLU questions of several subjects in one split, for cloze scoring of the answer *text*.

    Docs: ``{subject (readable), question, choices[4], gold}``; one seeded shuffle over all
    subjects, so ``limit=N`` is a uniform sample of their questions.
    """
    root = data_root(data_dir)
    docs, first = [], None
    for subject in subjects:
        src = resolve(root, f"{test_dir}/{subject}_test.csv")
        first = first or src
        for row in _mmlu_rows(src):
            docs.append({"subject": subject.replace("_", " "), **row})
    if first is None:
        raise TaskDataError("load_mmlu_cloze: no subjects given")
    return _dataset_dict({"test": shuffled(docs, shuffle_seed)}, first)


def response_bits_per_byte(doc: dict, results: list) -> dict:
    """``process_results`` of the reference-answer tasks: ``(log-likelihood, bytes of the answer)``.

    lm-eval's ``bits_per_byte`` aggregation turns the pairs into ``-sum(ll) / (ln 2 * sum(bytes))``.
    """
    ll = results[0][0] if isinstance(results[0], list | tuple) else results[0]
    return {"bits_per_byte": (float(ll), len(str(doc["response"]).encode("utf-8")))}
