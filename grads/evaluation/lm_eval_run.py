"""Running lm-eval in process: quiet logs, preserved RNG state, an in-memory HFLM and one
``simple_evaluate`` call over a validated :class:`~grads.evaluation.plan.Plan`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grads.evaluation.plan import Plan

log = logging.getLogger(__name__)


class _DropNoise(logging.Filter):
    """Drop lm-eval messages that are expected for in-process runs of these tasks."""

    NOISE = (
        "Custom kwargs can be passed",  # once per custom_dataset task
        "Overwriting default num_fewshot",  # once per task when eval.num_fewshot is set
        "num_fewshot has been set to 0",  # tasks pinned to zero-shot
        "model kwarg is not of type `str`",  # HFLM wrapping an in-memory model
        "Passed an already-initialized model",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


_NOISY_LOGGERS = ("lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface")


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Lower lm-eval's log volume (per-task INFO lines, expected warnings) inside the block."""
    root = logging.getLogger("lm_eval")
    old, flt = root.level, _DropNoise()
    root.setLevel(max(level, old))
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(flt)
    try:
        yield
    finally:
        root.setLevel(old)
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(flt)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """simple_evaluate seeds the global RNGs; restore the caller's state afterwards."""
    import numpy as np
    import torch

    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_lm_eval(
    plan: Plan, model: Any, tokenizer: Any, ev: dict, names: list[str] | None = None
) -> dict:
    """Evaluate an in-memory model on (a subset of) the plan's tasks with ``simple_evaluate``.

    Tasks marked ``grads_chat`` run in a second ``simple_evaluate`` call with the model's chat
    template and ``data.system_prompt`` (the training format); the others use the suite's settings.
    Per-item results are kept (``log_samples``) and condensed by :func:`grads.evaluation.items.extract`.

    Args:
        plan: from :func:`prepare`.
        model: a ``transformers`` causal LM (any device; left where it is).
        tokenizer: its tokenizer.
        ev: :func:`eval_settings`.
        names: requested names to run (default: all of the plan's).

    Returns:
        lm-eval's results dict (``results``, ``n-samples``, ...; the two calls merged) plus
        ``items``: leaf task -> per-item arrays (see :mod:`grads.evaluation.items`).
    """
    from grads.evaluation.items import extract

    names = list(names or plan.names)
    is_chat = {n: bool(set(plan.leaves[n]) & plan.chat) for n in names}
    chat = bool(ev["apply_chat_template"])
    runs = [
        (
            [n for n in names if not is_chat[n]],
            chat,
            ev["system_instruction"],
            ev["fewshot_as_multiturn"],
        ),
        ([n for n in names if is_chat[n]], True, plan.chat_system, False),
    ]
    was_training = bool(getattr(model, "training", False))
    model.eval()
    merged: dict[str, Any] = {"results": {}, "n-samples": {}, "groups": {}, "items": {}}
    try:
        with quiet_lm_eval(), preserved_rng():
            lm = hflm_class()(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=int(ev["batch_size"]),
                max_length=ev["max_length"],
            )
            for run_names, apply_chat, system, multiturn in runs:
                if not run_names:
                    continue
                out = _simple_evaluate(plan, lm, ev, run_names, apply_chat, system, multiturn)
                for key in ("results", "n-samples", "groups"):
                    merged[key] |= out.get(key) or {}
                merged["items"] |= extract(out.get("samples") or {}, lm)
                for key, value in out.items():
                    merged.setdefault(key, value)
    finally:
        model.train(was_training)
    merged.pop("samples", None)  # whole documents: condensed into "items"
    return merged


def hflm_class():
    """lm-eval's ``HFLM`` scoring a continuation from the exact end of a newline-ended context.

    lm-eval moves a context's trailing whitespace into the continuation (so that ``"Answer: " +
    "A"`` is tokenised as ``" A"``). A chat-formatted context ends with the assistant header's
    newline; moved, that newline would be scored as the first "response" token, which training
    never supervises (``grads.data.pool.tokenize_record`` ends the prompt after it) and which doubles
    the token count of one-token answers. For contexts ending in a newline the split is therefore
    made at the context's own tokens, when the whole sequence tokenises as context + continuation
    (BPE pre-tokenisers never merge a newline into the next word); otherwise lm-eval's rule applies.
    """
    from lm_eval.models.huggingface import HFLM

    class GradsHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str):
            if context.endswith("\n") and self.backend == "causal":
                ctx = self.tok_encode(context)
                whole = self.tok_encode(context + continuation)
                if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
                    return ctx, whole[len(ctx) :]
            return super()._encode_pair(context, continuation)

    return GradsHFLM


def _simple_evaluate(
    plan: Plan,
    lm: Any,
    ev: dict,
    names: list[str],
    apply_chat: bool,
    system: str | None,
    multiturn: bool | None,
) -> dict:
    from lm_eval.evaluator import simple_evaluate

    objects = plan.fresh_objects(names)
    samples = {
        leaf: idx
        for leaf, idx in plan.samples().items()
        if any(leaf in plan.leaves[n] for n in names)
    }
    seed = int(ev["seed"])
    out = simple_evaluate(
        model=lm,
        tasks=[objects[n] for n in names],
        task_manager=plan.manager,
        num_fewshot=ev["num_fewshot"],
        samples=samples,
        apply_chat_template=apply_chat,
        fewshot_as_multiturn=apply_chat if multiturn is None else bool(multiturn),
        system_instruction=system,
        log_samples=True,
        bootstrap_iters=int(ev["bootstrap_iters"]),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # only rank 0 gets results
        raise RuntimeError("lm-eval returned no results (not rank 0?)")
    return out


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), wall seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
