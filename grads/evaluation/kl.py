"""Label-free drift: mean per-token KL(base || tuned), teacher-forced on reference answers.

lm-eval returns one log-likelihood per request, not the distributions two models assign to every
next token, so KL is computed here, inside the evaluate stage, on *the same token sequences*
lm-eval scored: the ``(context ids, continuation ids)`` pairs of the KL task's items, encoded by
lm-eval's own tokenisation (:func:`grads.evaluation.items.encode_pair`). Both models see the same
right-padded batches; at every continuation position ``t`` (the reference answer, teacher-forced)

    KL_t = sum_v p_base(v | x_<t) * (log p_base(v | x_<t) - log p_tuned(v | x_<t))

in float32 over the full vocabulary, and an item's ``kl`` is the sum over its continuation tokens.
``general_kl`` = ``sum(kl) / sum(tokens)`` over items (grads.evaluation.metrics). KL(base || tuned)
weighs the drift by what the *base* model believed: it is large where the tuned model lost mass on
the base model's likely tokens, i.e. forgetting. The base model is not cached for this (its full
distributions would be ~200 KB per token); it is loaded and run on the KL items every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def token_kl(base_logits, tuned_logits):
    """``KL(softmax(base) || softmax(tuned))`` over the last dimension, computed in float32.

    Args:
        base_logits: ``[..., V]`` logits of the reference (base) model.
        tuned_logits: ``[..., V]`` logits of the tuned model at the same positions.

    Returns:
        ``[...]`` non-negative KL per position (nats).
    """
    import torch

    lp = torch.log_softmax(base_logits.float(), dim=-1)
    lq = torch.log_softmax(tuned_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def _window(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """Model input and the index of the first continuation logit, left-truncated as lm-eval does."""
    whole = list(ctx) + list(cont)
    inp = whole[-(max_length + 1) :][:-1]
    return inp, len(inp) - len(cont)


def _logits(model: Any, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits


def kl_items(
    base: Any,
    tuned: Any,
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 4,
    max_length: int = 2048,
    pad_id: int = 0,
) -> dict[str, list[float]]:
    """Per-item KL(base || tuned) and both models' NLL on teacher-forced continuations.

    Args:
        base: the base causal LM.
        tuned: the tuned causal LM (same tokenizer).
        encoded: per item ``(context ids, continuation ids)``; the context must not be empty.
        batch_size: items per forward (right padding; sorted by length to limit padding).
        max_length: longest model input (longer items are left-truncated, as in lm-eval).
        pad_id: padding token id (masked out).

    Returns:
        ``{"kl", "tokens", "nll_base", "nll_tuned"}``, one entry per item in input order.
    """
    import torch

    n = len(encoded)
    out = {k: [0.0] * n for k in ("kl", "tokens", "nll_base", "nll_tuned")}
    windows = [_window(c, x, max_length) for c, x in encoded]
    order = sorted(range(n), key=lambda i: -len(windows[i][0]))
    models = [(base, bool(base.training)), (tuned, bool(tuned.training))]
    for m, _ in models:
        m.eval()
    device = next(tuned.parameters()).device
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                T = max(len(windows[i][0]) for i in idx)
                ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), T), dtype=torch.long)
                for r, i in enumerate(idx):
                    inp = windows[i][0]
                    ids[r, : len(inp)] = torch.as_tensor(inp)
                    mask[r, : len(inp)] = 1
                ids, mask = ids.to(device), mask.to(device)
                lb = _logits(base, ids, mask)
                lt = _logits(tuned, ids, mask)
                for r, i in enumerate(idx):
                    inp, start = windows[i]
                    cont = torch.as_tensor(list(encoded[i][1]), device=device)
                    pb, pt = lb[r, start : len(inp)], lt[r, start : len(inp)]
                    out["kl"][i] = float(token_kl(pb, pt).double().sum())
                    out["tokens"][i] = float(len(cont))
                    for key, logits in (("nll_base", pb), ("nll_tuned", pt)):
                        logp = torch.log_softmax(logits.float(), dim=-1)
                        out[key][i] = -float(logp.gather(1, cont[:, None]).double().sum())
                del lb, lt
    finally:
        for m, was in models:
            m.train(was)
    return out
