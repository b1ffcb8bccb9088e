"""What a subset is made of, against its pool: groups, lengths, answers, near duplicates.

:func:`composition` compares the selected samples with the pool they were picked from along four
axes, each cheap enough for a pool of millions (one pass, or a bounded sample):

* **groups** (categorical): ``source`` (the pool source, when the domain has several), ``file``
  (the shard, when a custom pool has several) and ``template``: the record's *detected template*,
  a word prefix of its prompt (lower-cased, digits read as 0; a chat record's first user turn),
  grown word by word up to :data:`PREFIX_WORDS` words while the longer prefix is shared by at least
  :data:`MIN_TEMPLATE_SHARE` of the pool (and 3 samples) and by at least :data:`BRANCH_SHARE` of
  the samples with the shorter one. So "What is the capital of {country}?" stops before the
  country (many values, each a small share), while "What is the capital ..." and "What is the sum
  ..." become two templates. Hand-written pools built from a few templates split into those
  templates; a diverse pool splits into its common openings ("write a", "what is"); prompts with
  no common opening are ``(other)``. A slot filled by only a few values (at least a fifth each)
  is read as a branch of the template.
  At most :data:`MAX_GROUPS` groups are kept (the largest in the pool; the rest are ``(other)``).
* **answers**: the answer classes of a label-like pool (at most
  :data:`grads.selectors.balance.MAX_ANSWER_CLASSES` distinct responses), else absent.
* **length**: quantiles (10, 25, 50, 75, 90 %) of supervised tokens (the features table's
  ``n_tokens``) and of prompt / response characters, subset against pool, and the share of the
  subset above the pool's median (0.5 for a subset of typical length).
* **duplicates**: the share of samples whose prompt occurs twice or more (after lower-casing and
  collapsing whitespace) and the share that has a near duplicate (word 3-gram Jaccard similarity
  >= :data:`NEAR_JACCARD` over prompt + response), inside the subset and inside random pool
  samples of the same size (so the two rates are comparable). Sets larger than
  :data:`MAX_DUP_SET` are sampled down to it.

Each categorical axis reports the pool's and the subset's counts and their total variation
distance ``TV = 1/2 sum_g |subset share_g - pool share_g|``. It is flagged ``concentrated`` when
``TV >= threshold`` (``export.concentration_warning``, default 0.2, the select stage's
:data:`~grads.selectors.balance.SKEW_WARNING`) **and** ``TV`` exceeds the 95th percentile of the
TV of random subsets of the same size (``random_p95``; :data:`RANDOM_DRAWS` multivariate
hypergeometric draws), so a small subset is not flagged for the scatter of chance alone. The
duplicate rates are flagged when the subset's near-duplicate share is at least 0.1 and twice the
pool samples'. Every flag becomes a line in ``warnings`` and a logged warning.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_GROUPS = 20
OTHER = "(other)"
PREFIX_WORDS = 6
MIN_TEMPLATE_SHARE = 0.02
BRANCH_SHARE = 0.2
RANDOM_DRAWS = 2000
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
NGRAM = 3
NEAR_JACCARD = 0.8
MAX_DUP_SET = 2000
POOL_SAMPLES = 3  # random pool samples whose duplicate rates are averaged
DUP_WARNING = 0.1
_WORD = re.compile(r"\w+")
_DIGITS = re.compile(r"\d+")


def composition(
    records: Mapping[str, Any],
    pool_ids: Sequence[str],
    selected_ids: Sequence[str],
    n_tokens: Mapping[str, float] | None = None,
    threshold: float = 0.2,
    seed: int = 0,
    labels: Mapping[str, Mapping[str, str]] | None = None,
) -> dict:
    """The composition summary of ``selected_ids`` against ``pool_ids`` (see the module docstring).

    Args:
        records: ``{id: grads.data.records.Record}`` of the pool (ids without a record count as unknown).
        pool_ids: every pool sample (the features table's ids, or the records').
        selected_ids: the subset, a part of the pool.
        n_tokens: ``{id: supervised tokens}`` from the features table, when there is one.
        threshold: the total variation distance from which an axis can be flagged.
        seed: seeds the random baselines (the result is deterministic).
        labels: :func:`group_labels` of the pool, when the caller has them already.

    Returns:
        ``{"groups": {axis: {...}}, "answers": {...} | None, "length": {...}, "duplicates": {...},
        "warnings": [...], "settings": {...}}``.
    """
    rng = np.random.default_rng(seed)
    pool, chosen = list(pool_ids), list(selected_ids)
    labels = labels or group_labels(records, pool)
    groups = {
        axis: categorical(lab, pool, chosen, threshold, rng)
        for axis, lab in labels.items()
        if axis == "template" or len(set(lab.values())) > 1
    }
    answers = _answers(records, list(dict.fromkeys([*pool, *chosen])))
    out = {
        "groups": groups,
        "answers": categorical(answers, pool, chosen, threshold, rng) if answers else None,
        "length": lengths(records, pool, chosen, n_tokens),
        "duplicates": duplicates(records, pool, chosen, rng),
        "settings": {
            "concentration_warning": threshold,
            "random_draws": RANDOM_DRAWS,
            "template_prefix_words": PREFIX_WORDS,
            "template_min_share": MIN_TEMPLATE_SHARE,
            "template_branch_share": BRANCH_SHARE,
            "near_duplicate": f"word {NGRAM}-gram Jaccard >= {NEAR_JACCARD}",
            "max_duplicate_set": MAX_DUP_SET,
        },
    }
    out["warnings"] = warnings_of(out, len(chosen))
    for line in out["warnings"]:
        log.warning("export: %s", line)
    return out


# --------------------------------------------------------------------------------------------------
# Group labels
# --------------------------------------------------------------------------------------------------
def group_labels(
    records: Mapping[str, Any], pool: Sequence[str], extra: Sequence[str] = ()
) -> dict[str, dict[str, str]]:
    """``{"source": {id: source}, "file": {id: shard}, "template": {id: template}}`` over the pool
    and the ``extra`` ids (the subset, when the pool is a sample); templates are detected from the
    pool's prompts alone."""
    ids = list(dict.fromkeys([*pool, *extra]))
    recs = [(i, records.get(i)) for i in ids]
    source = {i: str(r.source) if r else "(unknown)" for i, r in recs}
    file = {i: str((r.meta or {}).get("file", "")) if r else "(unknown)" for i, r in recs}
    words = {i: _prefix_words(r) for i, r in recs}
    return {"source": source, "file": file, "template": templates(words, counted=pool)}


def _prefix_words(rec: Any) -> tuple[str, ...]:
    """The first :data:`PREFIX_WORDS` words of a record's prompt (lower-case, digits as 0)."""
    if rec is None:
        return ()
    text = rec.prompt
    turns = (rec.meta or {}).get("messages")
    if turns:  # chat records: their first user turn (the prompt joins every earlier turn)
        text = next((t["content"] for t in turns if t.get("role") == "user"), text)
    words = _WORD.findall(_DIGITS.sub("0", str(text).lower()))
    return tuple(words[:PREFIX_WORDS])


def templates(
    words: Mapping[str, tuple[str, ...]], counted: Sequence[str] | None = None
) -> dict[str, str]:
    """Each sample's template: its prompt prefix, extended word by word while the longer prefix
    is still shared by enough of the pool and by at least :data:`BRANCH_SHARE` of the samples
    that share the shorter one (a slot filled by many values stops it; a few templates that start
    alike branch). The shares are counted over the ``counted`` ids (default: all)."""
    pool = [words[i] for i in counted] if counted is not None else list(words.values())
    need = max(3, int(np.ceil(MIN_TEMPLATE_SHARE * len(pool))))
    counts: Counter = Counter()
    for w in pool:
        counts.update(w[:n] for n in range(1, len(w) + 1))
    out = {}
    for i, w in words.items():
        n = 0
        while n < len(w) and counts[w[: n + 1]] >= need:
            if n and counts[w[: n + 1]] < BRANCH_SHARE * counts[w[:n]]:
                break
            n += 1
        out[i] = " ".join(w[:n]) + " ..." if n else OTHER
    return out


def _answers(records: Mapping[str, Any], pool: Sequence[str]) -> dict[str, str] | None:
    """``{id: answer}`` when the pool's answers are labels, else ``None``."""
    from grads.selectors.balance import group_labels as answer_groups

    recs = [records[i] for i in pool if i in records]
    try:
        return answer_groups(recs, "answer")
    except ValueError:
        return None  # free text: no answer classes


# --------------------------------------------------------------------------------------------------
# Categorical axes
# --------------------------------------------------------------------------------------------------
def categorical(
    labels: Mapping[str, str],
    pool: Sequence[str],
    chosen: Sequence[str],
    threshold: float,
    rng: np.random.Generator,
) -> dict:
    """Counts of the pool and the subset over one axis, their TV and the random baseline."""
    raw = Counter(labels.get(i, "(unknown)") for i in pool)
    keep = {g for g, _ in sorted(raw.items(), key=lambda x: (-x[1], x[0]))[: MAX_GROUPS - 1]}
    if len(raw) <= MAX_GROUPS:
        keep = set(raw)

    def group(i: str) -> str:
        g = labels.get(i, "(unknown)")
        return g if g in keep else OTHER

    in_pool = Counter(group(i) for i in pool)
    in_sub = Counter(group(i) for i in chosen)
    order = sorted(in_pool, key=lambda g: (-in_pool[g], g))
    tv = total_variation(in_pool, in_sub)
    p95 = random_tv(np.array([in_pool[g] for g in order]), len(chosen), rng)
    return {
        "groups": len(raw),
        "pool": {g: in_pool[g] for g in order},
        "subset": {g: in_sub[g] for g in order if in_sub[g]},
        "total_variation": round(tv, 4),
        "random_p95": round(p95, 4),
        "concentrated": bool(tv >= threshold and tv > p95),
    }


def total_variation(pool: Mapping[str, int], subset: Mapping[str, int]) -> float:
    """``1/2 sum |subset share - pool share|`` (0: the pool's shares; 1: disjoint groups)."""
    n_pool, n_sub = sum(pool.values()), sum(subset.values())
    if not n_pool or not n_sub:
        return 0.0
    keys = set(pool) | set(subset)
    return 0.5 * sum(abs(subset.get(g, 0) / n_sub - pool.get(g, 0) / n_pool) for g in keys)


def random_tv(counts: np.ndarray, k: int, rng: np.random.Generator) -> float:
    """95th percentile of the TV of uniformly random ``k``-subsets of a pool with group ``counts``."""
    n = int(counts.sum())
    if k <= 0 or k >= n or counts.size < 2:
        return 0.0
    draws = rng.multivariate_hypergeometric(counts.astype(np.int64), k, size=RANDOM_DRAWS)
    tv = 0.5 * np.abs(draws / k - counts / n).sum(axis=1)
    return float(np.quantile(tv, 0.95))


# --------------------------------------------------------------------------------------------------
# Length
# --------------------------------------------------------------------------------------------------
def lengths(
    records: Mapping[str, Any],
    pool: Sequence[str],
    chosen: Sequence[str],
    n_tokens: Mapping[str, float] | None,
) -> dict:
    """Quantiles of each length measure, subset against pool."""
    measures: dict[str, Mapping[str, float]] = {}
    if n_tokens:
        measures["supervised_tokens"] = n_tokens
    measures["prompt_chars"] = {i: len(r.prompt) for i, r in records.items()}
    measures["response_chars"] = {i: len(r.response) for i, r in records.items()}
    out = {}
    for name, value in measures.items():
        p = np.array([value[i] for i in pool if i in value], dtype=np.float64)
        s = np.array([value[i] for i in chosen if i in value], dtype=np.float64)
        p, s = p[np.isfinite(p)], s[np.isfinite(s)]
        if not p.size or not s.size:
            continue
        out[name] = {
            "pool": _quantiles(p),
            "subset": _quantiles(s),
            "subset_above_pool_median": round(float(np.mean(s > np.median(p))), 4),
        }
    return out


def _quantiles(a: np.ndarray) -> dict[str, float]:
    return {f"q{round(q * 100)}": round(float(np.quantile(a, q)), 2) for q in QUANTILES}


# --------------------------------------------------------------------------------------------------
# Near duplicates
# --------------------------------------------------------------------------------------------------
def duplicates(
    records: Mapping[str, Any], pool: Sequence[str], chosen: Sequence[str], rng: np.random.Generator
) -> dict:
    """Exact-prompt and near-duplicate shares inside the subset and inside same-size pool samples."""
    known = [i for i in pool if i in records]
    sub = [i for i in chosen if i in records]
    size = min(len(sub), MAX_DUP_SET, len(known))  # known: the pool, or its sample
    if size < 2:
        return {"sample_size": size, "subset": None, "pool_sample": None}
    if len(sub) > size:
        sub = list(rng.choice(np.array(sub, dtype=object), size, replace=False))
    samples = [
        list(rng.choice(np.array(known, dtype=object), size, replace=False))
        for _ in range(POOL_SAMPLES if size < len(known) else 1)
    ]
    rates = [_dup_rates([records[i] for i in s]) for s in samples]
    return {
        "sample_size": size,
        "subset": _dup_rates([records[i] for i in sub]),
        "pool_sample": {
            k: round(float(np.mean([r[k] for r in rates])), 4) for k in ("exact_prompt", "near")
        },
    }


def _dup_rates(recs: list) -> dict[str, float]:
    """Shares of ``recs`` with an exact-prompt duplicate and with a near duplicate among them."""
    from grads.data.records import normalise_text

    prompts = Counter(normalise_text(r.prompt) for r in recs)
    exact = sum(prompts[normalise_text(r.prompt)] > 1 for r in recs) / len(recs)
    near = near_duplicate_mask([f"{r.prompt}\n{r.response}" for r in recs])
    return {"exact_prompt": round(float(exact), 4), "near": round(float(near.mean()), 4)}


def near_duplicate_mask(texts: Sequence[str]) -> np.ndarray:
    """Which texts have another text with word 3-gram Jaccard >= :data:`NEAR_JACCARD`.

    One sparse product of the texts' binary shingle matrix gives every pairwise intersection;
    ``|A & B| / (|A| + |B| - |A & B|)`` is the Jaccard similarity. Texts of fewer than three words
    are one shingle (themselves).
    """
    import scipy.sparse as sp

    vocab: dict[tuple, int] = {}
    rows, cols = [], []
    for r, text in enumerate(texts):
        words = _WORD.findall(str(text).lower())
        grams = {tuple(words[j : j + NGRAM]) for j in range(max(1, len(words) - NGRAM + 1))}
        for g in grams:
            rows.append(r)
            cols.append(vocab.setdefault(g, len(vocab)))
    x = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(texts), len(vocab))
    )
    inter = (x @ x.T).toarray()
    size = np.asarray(x.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = inter / (size[:, None] + size[None, :] - inter)
    np.fill_diagonal(jac, 0.0)
    return np.nan_to_num(jac).max(axis=1) >= NEAR_JACCARD


# --------------------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------------------
def warnings_of(summary: dict, k: int) -> list[str]:
    """One sentence per flagged axis, naming the subset's and the pool's shares."""
    out = []
    axes = dict(summary["groups"])
    if summary.get("answers"):
        axes["answer"] = summary["answers"]
    for axis, c in axes.items():
        if c["concentrated"]:
            top = max(c["subset"], key=c["subset"].get)
            out.append(
                f"the subset is concentrated by {axis}: {c['subset'][top]} of {k} picks are "
                f"{top!r} ({_pct(c['subset'][top], k)} of the subset, "
                f"{_pct(c['pool'].get(top, 0), sum(c['pool'].values()))} of the pool; total "
                f"variation {c['total_variation']:.2f}; 95 % of random subsets of this size stay "
                f"within {c['random_p95']:.2f})"
            )
    dup = summary["duplicates"]
    if dup.get("subset"):
        s, p = dup["subset"]["near"], dup["pool_sample"]["near"]
        if s >= DUP_WARNING and s >= 2 * p:
            out.append(
                f"the subset repeats itself: {_pct(s, 1)} of it has a near duplicate inside the "
                f"subset, against {_pct(p, 1)} in random pool samples of the same size"
            )
    return out


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "0 %"
