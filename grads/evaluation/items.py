"""Per-item results: lm-eval's logged samples condensed into small arrays that pair across runs.

Every leaf task becomes ``{"keys": [...], <field>: [...]}`` with one entry per evaluated document:

* multiple choice: ``acc`` and, where the task reports it, ``acc_norm`` (0/1 per item);
* ``loglikelihood`` (held-out domain loss, reference answers): ``nll`` (minus the summed
  log-probability of the continuation), ``tokens`` (continuation tokens, tokenised exactly as lm-eval
  did: the pair is encoded whole and split after the context) and ``bytes`` (UTF-8 bytes of the
  continuation);
* ``loglikelihood_rolling`` (plain text): ``nll`` over the whole text, ``tokens`` and ``bytes``.

An item's key is ``<doc_id>-<first 8 hex of lm-eval's doc hash>``: the same document in two runs of
the same suite has the same key, so a collector can pair methods item by item. Log-likelihood items
also keep their ``(context ids, continuation ids)`` under ``_enc`` (in memory only: the KL pass
scores the same token sequences; :func:`public` drops them before anything is written).
"""

from __future__ import annotations

import math
from typing import Any

LN2 = math.log(2.0)


def _key(sample: dict) -> str:
    return f"{sample['doc_id']}-{str(sample.get('doc_hash', ''))[:8]}"


def _ll(resp: Any) -> float:
    """The log-likelihood in a filtered response: ``(ll, is_greedy)`` or a bare ``ll``."""
    return float(resp[0] if isinstance(resp, list | tuple) else resp)


def encode_pair(lm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` exactly as lm-eval's ``loglikelihood`` scores a request."""
    if not context:  # lm-eval conditions an empty context on its prefix token
        return [lm.prefix_token_id], list(lm.tok_encode(continuation))
    ctx, cont = lm._encode_pair(context, continuation)
    return list(ctx), list(cont)


def _task_items(rows: list[dict], lm: Any) -> dict:
    rows = sorted(rows, key=lambda r: r["doc_id"])
    out: dict[str, list] = {"keys": [_key(r) for r in rows]}
    first = rows[0] if rows else {}
    if "acc" in first:  # multiple choice
        for metric in ("acc", "acc_norm"):
            if metric in first:
                out[metric] = [float(r[metric]) for r in rows]
        return out
    args = [r["arguments"][0] for r in rows]
    out["nll"] = [-_ll(r["filtered_resps"][0]) for r in rows]
    if args and len(args[0]) == 1:  # loglikelihood_rolling: (text,)
        texts = [a[0] for a in args]
        out["tokens"] = [len(lm.tok_encode(t)) for t in texts]
        out["bytes"] = [len(t.encode("utf-8")) for t in texts]
        return out
    pairs = [(str(a[0]), str(a[1])) for a in args]
    enc = [encode_pair(lm, c, x) for c, x in pairs]
    out["tokens"] = [len(x) for _, x in enc]
    out["bytes"] = [len(x.encode("utf-8")) for _, x in pairs]
    out["_enc"] = enc
    return out


def extract(samples: dict[str, list[dict]], lm: Any) -> dict[str, dict]:
    """Leaf task -> per-item arrays, from ``simple_evaluate(log_samples=True)["samples"]``."""
    return {task: _task_items(rows, lm) for task, rows in samples.items() if rows}


def public(items: dict[str, dict]) -> dict[str, dict]:
    """``items`` without the in-memory fields (leading underscore)."""
    return {t: {k: v for k, v in d.items() if not k.startswith("_")} for t, d in items.items()}


def gather(items: dict[str, dict], leaves: list[str], size_weighted: bool = True) -> dict:
    """One requested name's items: its leaves' arrays concatenated, keys prefixed by the leaf.

    A group that averages its leaves' scores (``weight_by_size: false``) gives every item the weight
    ``1 / n_leaf`` (field ``w``), so ``sum(w * acc) / sum(w)`` equals lm-eval's group score.
    """
    out: dict[str, list] = {}
    for leaf in leaves:
        if leaf not in items:
            raise KeyError(f"no per-item results for task '{leaf}'")
        d = items[leaf]
        n = len(d["keys"])
        out.setdefault("keys", []).extend(
            f"{leaf}/{k}" if len(leaves) > 1 else k for k in d["keys"]
        )
        for field, values in d.items():
            if field != "keys" and not field.startswith("_"):
                out.setdefault(field, []).extend(values)
        if "_enc" in d:
            out.setdefault("_enc", []).extend(d["_enc"])
        if not size_weighted and len(leaves) > 1:
            out.setdefault("w", []).extend([1.0 / n] * n)
    return out
