"""Exact per-sample gradient features of the embedding and LM head, computed in one batched pass.

For sample ``i`` with supervised (shifted) positions ``t = 1..n_i`` the SFT loss is

    L_i = (1/n_i) sum_t CE(z_t, y_t),      z_t = W h_t (+ b),                               (1)

with ``h_t`` the final hidden state feeding the LM head ``W`` (V x D) and ``E`` (V x D) the input
embedding table. GrADS (arXiv 2511.08620) scores samples by the norms of ``dL_i/dE`` and ``dL_i/dW``.
Both are computed here exactly, for a whole batch, without ever forming a per-sample V x D matrix and
without computing any weight gradient:

* **LM head.** ``dL_i/dz_t = G_t = (softmax(z_t) - onehot(y_t)) / n_i`` is known right after the
  forward, and ``dL_i/dW = sum_t G_t^T h_t = G_i^T H_i``. Its squared Frobenius norm is either

      ||G_i^T H_i||^2 = <G_i G_i^T, H_i H_i^T>          (ghost form, cost n^2 (V + D))      (2)

  or the direct product reduced slice by slice over the vocabulary (cost n V D); the cheaper one is
  chosen per sample (ghost iff ``n (V + D) <= V D``, i.e. roughly ``n <= D``).
* **Embedding.** ``dL_i/dE`` has one row per distinct input token ``u`` of sample ``i``:
  ``a_u = sum_{t: x_t = u} dL_i/dx_t`` with ``x_t`` the looked-up input embedding. The activation
  gradient ``dL/dx`` of the *summed* batch loss gives every sample's rows at once because samples do
  not interact; it is obtained by one backward pass with respect to ``inputs_embeds`` only (all
  parameters frozen for the duration of the call, so autograd computes no weight gradient).
* **Tied weights.** With ``W = E`` the parameter's gradient is ``A + B`` (``A`` the embedding use,
  ``B = G^T H``), and

      ||A + B||^2 = ||A||^2 + ||B||^2 + 2 sum_u sum_t G_t[u] (a_u . h_t),                    (3)

  where ``u`` runs over the sample's distinct input tokens only, so the cross term needs just the
  ``n x k`` columns ``G[:, U]``. They are recomputed from ``h_t``, ``W[U]`` and the saved
  log-normaliser, so no full-vocabulary tensor is kept for it.

Memory stays bounded by ``chunk_bytes`` per V-wide buffer: tokens are processed in groups of whole
samples whose ``[tokens, V]`` logits fit; a sample longer than that is handled in two passes (its
log-normalisers first, then vocabulary slices).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from grads.constants import IGNORE_INDEX

STAT_KEYS = (
    "embed_tok_mean",
    "embed_tok_std",
    "embed_tok_max",
    "head_tok_mean",
    "head_tok_std",
    "head_tok_max",
)


# --------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------
def _parts(model: nn.Module) -> tuple[nn.Module, nn.Embedding, nn.Linear, Any]:
    """Return ``(backbone, input embedding, output projection, config)`` of a (peft-wrapped) LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (not a causal LM?)")
    if hasattr(head, "base_layer") or hasattr(emb, "base_layer"):
        raise NotImplementedError(
            "adapters on the embedding or the LM head are not supported "
            "(put LoRA on attention/MLP modules only)"
        )
    # We feed E[ids] as `inputs_embeds`, which equals the module's output only for a plain lookup
    # (Gemma-style scaled embeddings or max_norm renormalisation would break that).
    if not (
        isinstance(emb, nn.Embedding)
        and type(emb).forward is nn.Embedding.forward
        and emb.max_norm is None
    ):
        raise NotImplementedError(f"input embedding {type(emb).__name__} is not a plain lookup")
    if not (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
        raise NotImplementedError(f"output projection {type(head).__name__} is not a plain Linear")
    config = getattr(base, "config", None)
    for knob in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, knob, None) not in (None, 1.0):
            raise NotImplementedError(f"config.{knob} changes the logits; not supported")
    backbone = base.get_decoder()
    if backbone is base:
        raise ValueError("could not locate the decoder backbone of the model")
    return backbone, emb, head, config


@contextlib.contextmanager
def frozen_model(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter and switch to eval mode; restore both flags on exit.

    Freezing is what keeps autograd from computing any weight gradient during the embedding backward;
    eval mode makes the features deterministic (no dropout).
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over attended tokens only (``cumsum(mask) - 1``, pads clamped to 0).

    ``LlamaForCausalLM.forward`` without ``position_ids`` uses ``arange(T)`` whatever the mask, so a
    left-padded sample is shifted by its padding; ``generate()`` instead derives positions from the
    mask as done here. We follow ``generate()`` so that a sample's features do not depend on the padding
    side or on which other samples share its batch (right padding gives identical positions either way,
    and for RoPE models the two agree up to rounding since RoPE only sees relative offsets).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def supervised_positions(attention_mask: Tensor, labels: Tensor) -> Tensor:
    """Positions ``t`` whose logits are scored: ``labels[t + 1] != -100`` (HF's causal shift).

    The predicting position must be attended too: under left padding a sample's first token would
    otherwise be "predicted" from a pad position, which an unpadded run never does.
    """
    sup = torch.zeros_like(labels, dtype=torch.bool)
    sup[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) & attention_mask[:, :-1].bool()
    return sup


# --------------------------------------------------------------------------------------------------
# LM-head math (all under no_grad, float32)
# --------------------------------------------------------------------------------------------------
class _Head:
    """Per-token cross-entropy pieces and per-sample head-gradient norms, chunked over memory.

    Args:
        h: ``[N, D]`` float32 hidden states of the supervised positions, grouped by sample.
        y: ``[N]`` target ids. ``scale``: ``[N]`` ``1/n_i`` of each token's sample.
        w, b: LM-head weight ``[V, D]`` (float32) and optional bias.
        logits: optional ``(z, sb, st)``: the ``[B, T, V]`` logits of a forward that already ran
            and the batch/time index of each supervised token. Logits are then read from ``z``
            (bias included) instead of recomputed from ``h`` and ``w``, and ``dL/dh`` is not formed
            (a training step's own backward supplies the input gradient).
    """

    def __init__(
        self,
        h: Tensor,
        y: Tensor,
        scale: Tensor,
        w: Tensor | None,
        b: Tensor | None,
        chunk_bytes: int,
        method: str,
        logits: tuple[Tensor, Tensor, Tensor] | None = None,
    ):
        self.h, self.y, self.scale, self.w, self.b = h, y, scale, w, b
        self.src = logits
        n_tok, self.D = h.shape
        # Under ZeRO-3 the LM-head weight is a partitioned stub outside forward: take V from z.
        self.V = logits[0].shape[-1] if logits is not None else w.shape[0]
        self.chunk_bytes = chunk_bytes
        self.method = method
        self.lse = torch.empty(n_tok, dtype=torch.float32, device=h.device)
        self.ce = torch.empty_like(self.lse)
        self.g_sq = torch.empty_like(self.lse)  # ||G_t||^2
        # dL/dh_t = G_t W, to backpropagate into the network (not needed with given logits)
        self.dh = torch.empty_like(h) if logits is None else None

    def logits(self, s: int, e: int, lo: int = 0, hi: int | None = None) -> Tensor:
        """A fresh float32 ``[e - s, hi - lo]`` block of logits (tokens ``[s, e)``, vocab slice)."""
        if self.src is not None:
            z, sb, st = self.src
            return z[sb[s:e], st[s:e], lo:hi].float()  # advanced indexing copies
        w = self.w[lo:hi]
        h = self.h[s:e]
        return torch.addmm(self.b[lo:hi], h, w.T) if self.b is not None else h @ w.T

    def use_ghost(self, n: int) -> bool:
        if self.method != "auto":
            return self.method == "ghost"
        return n * (self.V + self.D) <= self.V * self.D  # eq. (2): n^2 (V+D) vs n V D

    def vocab_step(self, extra_rows: int) -> int:
        return max(1, self.chunk_bytes // (4 * (extra_rows + self.D)))

    def group(self, s: int, e: int, spans: list[tuple[int, int]]) -> list[float]:
        """Samples whose tokens ``[s, e)`` fit one ``[tokens, V]`` buffer: everything in one pass."""
        h, y, scale = self.h[s:e], self.y[s:e], self.scale[s:e]
        z = self.logits(s, e)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        # logits -> G in place, one exp pass: the [tokens, V] buffer is the only big allocation.
        z_max = z.amax(dim=1)
        z.sub_(z_max[:, None]).exp_()
        denom = z.sum(dim=1)
        lse = z_max + denom.log()
        self.lse[s:e], self.ce[s:e] = lse, lse - z_y
        g = z.mul_((scale / denom)[:, None])  # softmax / n_i
        g[torch.arange(e - s, device=z.device), y] -= scale
        if self.dh is not None:
            torch.mm(g, self.w, out=self.dh[s:e])
        out = []
        for a, b in spans:  # absolute token offsets of each sample
            ga, ha = g[a - s : b - s], h[a - s : b - s]
            if self.use_ghost(b - a):
                gram = ga @ ga.T
                self.g_sq[a:b] = gram.diagonal()
                out.append(float((gram * (ha @ ha.T)).sum()))
            else:
                self.g_sq[a:b] = torch.linalg.vector_norm(ga, dim=1).square()
                step, acc = self.vocab_step(0), 0.0
                for v in range(0, self.V, step):
                    acc += float((ga[:, v : v + step].T @ ha).square().sum())
                out.append(acc)
        return out

    def long(self, a: int, b: int, tok_step: int) -> float:
        """One sample too long for a ``[n, V]`` buffer: log-normalisers first, then vocab slices."""
        h, y, n = self.h[a:b], self.y[a:b], b - a
        for s in range(0, n, tok_step):
            e = min(n, s + tok_step)
            z = self.logits(a + s, a + e)
            lse = torch.logsumexp(z, dim=1)
            self.lse[a + s : a + e] = lse
            self.ce[a + s : a + e] = lse - z.gather(1, y[s:e, None]).squeeze(1)
            del z
        lse, scale = self.lse[a:b], self.scale[a:b]
        ghost = self.use_ghost(n)
        gram = torch.zeros(n, n, device=h.device) if ghost else None
        dh = torch.zeros_like(h) if self.dh is not None else None
        g_sq = torch.zeros(n, device=h.device)
        acc, step = 0.0, self.vocab_step(n)
        for v in range(0, self.V, step):
            g = self.logits(a, b, v, v + step).sub_(lse[:, None]).exp_()
            hit = (y >= v) & (y < v + step)
            g[hit.nonzero().squeeze(1), y[hit] - v] -= 1.0
            g.mul_(scale[:, None])
            g_sq += g.square().sum(1)
            if dh is not None:
                dh.addmm_(g, self.w[v : v + step])
            if ghost:
                gram.addmm_(g, g.T)
            else:
                acc += float((g.T @ h).square().sum())
        self.g_sq[a:b] = g_sq
        if dh is not None:
            self.dh[a:b] = dh
        return float((gram * (h @ h.T)).sum()) if ghost else acc

    def columns(self, a: int, b: int, ids: Tensor) -> Tensor:
        """``G[:, ids]`` for the tokens ``[a, b)`` of one sample, recomputed from the saved lse."""
        y = self.y[a:b]
        if self.src is not None:
            zs, sb, st = self.src
            z = zs[sb[a:b, None], st[a:b, None], ids[None, :]].float()
        else:
            z = self.h[a:b] @ self.w[ids].T
            if self.b is not None:
                z += self.b[ids]
        g = z.sub_(self.lse[a:b, None]).exp_() - (y[:, None] == ids[None, :]).float()
        return g.mul_(self.scale[a:b, None])


def _segment_stats(values: Tensor, owner: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample mean, population std and max of ``values`` grouped by ``owner`` (NaN if empty)."""
    nan = torch.full((batch,), math.nan, dtype=torch.float64)
    mean, std, mx = nan.clone(), nan.clone(), nan.clone()
    values, owner = values.double().cpu(), owner.cpu()
    for i in range(batch):
        v = values[owner == i]
        if len(v):
            mean[i], std[i], mx[i] = v.mean(), v.std(correction=0), v.max()
    return mean.float(), std.float(), mx.float()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def per_sample_grad_norms(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    stats: bool = False,
    chunk_bytes: int = 1 << 26,
    method: str = "auto",
) -> dict[str, Tensor]:
    """Exact per-sample gradient norms of the input embedding and the LM head for one batch.

    Implements eqs. (1)-(3) of the module docstring: one forward with ``inputs_embeds = E[ids]``,
    the LM head's per-token output gradient ``G_t = (softmax(z_t) - onehot(y_t)) / n_i`` in
    memory-bounded chunks, per-sample ``||G_i^T H_i||`` in ghost or direct form, and one backward with
    respect to ``inputs_embeds`` only. No weight gradient and no per-sample V x D matrix is formed.

    Args:
        model: a Hugging Face causal LM (optionally wrapped by peft with adapters on inner modules).
            Its parameters, ``requires_grad`` flags, ``.grad`` and train/eval modes are unchanged on
            return.
        input_ids: ``[B, T]`` token ids (left or right padded).
        attention_mask: ``[B, T]``, 1 on real tokens.
        labels: ``[B, T]``; ``-100`` where no loss is taken. Shifted as in HF: logits at ``t`` predict
            ``labels[t + 1]``, counted only where position ``t`` is attended (so a sample's first
            token is never a target, padded or not).
        stats: also return per-sample mean/std/max of the per-token contributions: ``head_tok_*`` over
            supervised tokens of ``||G_t|| ||h_t||`` (the norm of token ``t``'s rank-one term of
            ``dL_i/dW``) and ``embed_tok_*`` over attended input positions (bar the embedding's
            ``padding_idx``) of ``||dL_i/dx_t||`` (the row a position adds to ``dL_i/dE``). Std is
            the population std.
        chunk_bytes: size cap of each float32 buffer that spans the vocabulary.
        method: ``auto`` (cheaper of ghost/direct per sample), ``ghost`` or ``direct`` (testing).

    Returns:
        float32 tensors of shape ``[B]`` on CPU: ``loss`` (mean CE over supervised tokens),
        ``n_tokens`` (int64), ``embed`` (``||dL_i/dE||_F`` through the lookup), ``lm_head``
        (``||dL_i/dW||_F`` through the projection), ``tied`` (only for tied models: norm of the shared
        matrix's total gradient, eq. (3)), and the ``STAT_KEYS`` when ``stats``. A sample with no
        supervised token gets ``n_tokens = 0`` and NaN everywhere else.
    """
    if method not in ("auto", "ghost", "direct"):
        raise ValueError(f"method={method!r}")
    backbone, emb, head, _ = _parts(model)
    device = emb.weight.device
    ids = input_ids.to(device)
    mask = attention_mask.to(device)
    tg = _Targets(mask, labels.to(device))

    with frozen_model(model):
        x = emb.weight[ids].detach().requires_grad_(True)
        with torch.enable_grad():
            hidden = backbone(
                inputs_embeds=x,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
            ).last_hidden_state

        with torch.no_grad():
            w = head.weight.detach().float()
            bias = head.bias.detach().float() if head.bias is not None else None
            h = hidden.detach()[tg.sb, tg.st].float()
            hd = _Head(h, tg.y, tg.scale, w, bias, chunk_bytes, method)
            head_sq = torch.zeros(len(tg.n), dtype=torch.float64)
            _run_head(hd, tg.offsets, head_sq)

        # Embedding use: one backward w.r.t. inputs_embeds only (params are frozen).
        if len(tg.y):
            grad_out = torch.zeros_like(hidden)
            grad_out[tg.sb, tg.st] = hd.dh.to(hidden.dtype)
            (dx,) = torch.autograd.grad(hidden, x, grad_outputs=grad_out)
            del grad_out
        else:
            dx = torch.zeros_like(x)
        del hidden  # frees the autograd graph's activations before the bookkeeping below

    return _finish(hd, head_sq, dx, None, ids, mask, tg, emb, head.weight is emb.weight, stats)


class _Targets:
    """Supervised tokens of a padded batch, grouped by sample (row-major order).

    Attributes: ``sb``/``st`` batch and time index of each scored position, ``y`` its target,
    ``n`` ``[B]`` supervised-token counts, ``offsets`` sample boundaries into the token axis and
    ``scale`` ``[N]`` the ``1/n_i`` of each token's sample.
    """

    def __init__(self, mask: Tensor, labels: Tensor):
        sup = supervised_positions(mask, labels)
        self.sb, self.st = sup.nonzero(as_tuple=True)
        self.y = labels[:, 1:][self.sb, self.st]
        self.n = sup.sum(1)
        self.offsets = [0, *torch.cumsum(self.n, 0).tolist()]
        self.scale = (1.0 / self.n.clamp(min=1).double()).float()[self.sb]


def _finish(
    hd: _Head,
    head_sq: Tensor,
    dx: Tensor,
    row_scale: Tensor | None,
    ids: Tensor,
    mask: Tensor,
    tg: _Targets,
    emb: nn.Embedding,
    tied: bool,
    stats: bool,
) -> dict[str, Tensor]:
    """Embedding norms, the tied cross term (eq. 3) and the per-token statistics of one batch.

    ``dx`` is the gradient of the loss with respect to the looked-up embeddings ``[B, T, D]``;
    ``row_scale`` (``[B]``, optional) turns sample ``i``'s rows into those of its mean loss
    ``L_i`` (a training step's ``dx`` is that of a summed, rescaled loss).
    """
    B = len(tg.n)
    V = hd.V
    device = dx.device
    with torch.no_grad():
        # nn.Embedding never sends gradient to its padding_idx row; mirror that exactly.
        valid = mask.bool()
        if emb.padding_idx is not None:
            valid &= ids != emb.padding_idx
        vb, vt = valid.nonzero(as_tuple=True)
        rows = dx[vb, vt].float()
        if row_scale is not None:
            rows.mul_(row_scale.to(device=device, dtype=rows.dtype)[vb, None])
        keys, inv = torch.unique(vb * V + ids[vb, vt], return_inverse=True)
        agg = torch.zeros(len(keys), rows.shape[1], device=device).index_add_(0, inv, rows)
        owner = keys // V
        embed_sq = torch.zeros(B, dtype=torch.float64, device=device)
        embed_sq.index_add_(0, owner, agg.square().sum(1).double())

        out: dict[str, Tensor] = {
            "loss": torch.zeros(B, dtype=torch.float64)
            .index_add_(0, tg.sb.cpu(), (hd.ce * tg.scale).double().cpu())
            .float(),
            "n_tokens": tg.n.cpu().long(),
            "embed": embed_sq.sqrt().float().cpu(),
            "lm_head": head_sq.sqrt().float(),
        }
        if tied:
            cross = torch.zeros(B, dtype=torch.float64)
            starts = torch.searchsorted(owner, torch.arange(B + 1, device=device)).tolist()
            for i in range(B):
                a, b, ua, ub = tg.offsets[i], tg.offsets[i + 1], starts[i], starts[i + 1]
                if b > a and ub > ua:
                    g_cols = hd.columns(a, b, keys[ua:ub] % V)  # [n_i, k_i]
                    cross[i] = float((g_cols * (hd.h[a:b] @ agg[ua:ub].T)).sum())
            total = embed_sq.cpu() + head_sq + 2 * cross
            out["tied"] = total.clamp(min=0).sqrt().float()
        if stats:
            head_tok = hd.g_sq.sqrt() * hd.h.norm(dim=1)
            out.update(zip(STAT_KEYS[3:], _segment_stats(head_tok, tg.sb, B)))
            out.update(zip(STAT_KEYS[:3], _segment_stats(rows.norm(dim=1), vb, B)))

        empty = (tg.n == 0).cpu()
        for key, val in out.items():
            if key != "n_tokens":
                val[empty] = math.nan
    return out


def _run_head(hd: _Head, offsets: list[int], head_sq: Tensor) -> None:
    """Pack samples into groups whose ``[tokens, V]`` logits fit ``chunk_bytes``; long ones alone."""
    cap = max(1, hd.chunk_bytes // (4 * hd.V))
    group: list[int] = []

    def flush() -> None:
        if group:
            spans = [(offsets[i], offsets[i + 1]) for i in group]
            for i, sq in zip(group, hd.group(spans[0][0], spans[-1][1], spans)):
                head_sq[i] = sq
            group.clear()

    for i in range(len(offsets) - 1):
        n_i = offsets[i + 1] - offsets[i]
        if n_i == 0:
            continue
        if n_i > cap:
            head_sq[i] = hd.long(offsets[i], offsets[i + 1], cap)
            continue
        if group and offsets[i + 1] - offsets[group[0]] > cap:
            flush()
        group.append(i)
    flush()


class GradNormRecorder:
    """The outputs of ``per_sample_grad_norms``, read off a training step's own forward and backward.

    A training micro-batch's loss is ``c * sum_t CE_t`` (``grads.training``: ``c`` = world size /
    supervised tokens of the global batch). Samples do not interact, so after its backward the
    gradient at sample ``i``'s looked-up embeddings is ``c n_i dL_i/dx``, and eq. (1)'s LM-head
    pieces need only the forward's final hidden states and logits. Hooks on the input embedding
    and the LM head capture those three tensors; the norms then go through the same ``_Head`` and
    ``_finish`` code as the separate pass (ghost/direct LM-head norm, token aggregation of the
    embedding rows, tied cross term, per-token statistics). No logit is recomputed, no weight
    gradient is read, and nothing is formed per sample beyond what the pass forms.

    What differs from the pass is only the model the step runs: its parameters at that step (before
    the update) and train mode (dropout, if any). With learning rate 0 and dropout 0 the numbers
    equal the pass's up to float rounding (tested).

    Usage, once per recorded micro-batch, between ``backward`` and the optimizer step::

        rec = GradNormRecorder(model)
        rec.arm()
        (c * token_loss_sum(model, batch)).backward()
        norms = rec.collect(batch, c)
        ...
        rec.close()

    Args:
        model: the trained module (plain or peft-wrapped; ``_parts`` rules apply).
        stats: also return the ``STAT_KEYS`` per-token statistics.
        chunk_bytes, method: as in ``per_sample_grad_norms``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        stats: bool = True,
        chunk_bytes: int = 1 << 26,
        method: str = "auto",
    ):
        if method not in ("auto", "ghost", "direct"):
            raise ValueError(f"method={method!r}")
        _, self.emb, self.head, _ = _parts(model)
        self.tied = self.head.weight is self.emb.weight
        self.stats, self.chunk_bytes, self.method = stats, chunk_bytes, method
        self._armed = False
        self._dx: Tensor | None = None
        self._h: Tensor | None = None
        self._z: Tensor | None = None
        self._handles = [
            self.emb.register_forward_hook(self._on_embed),
            self.head.register_forward_hook(self._on_head),
        ]

    def _on_embed(self, module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        if not self._armed:
            return None
        if not out.requires_grad:
            # Frozen embedding (LoRA): a leaf that asks for its gradient. The parameter gradients
            # do not change; the backward just continues to the first layer's input.
            out = out.detach().requires_grad_(True)
        out.register_hook(self._on_grad)
        return out

    def _on_grad(self, grad: Tensor) -> None:
        self._dx = grad.detach()

    def _on_head(self, module: nn.Module, args: Any, out: Tensor) -> None:
        if self._armed:
            self._h, self._z = args[0].detach(), out.detach()

    def arm(self) -> None:
        """Capture the next forward (and its backward)."""
        self._armed, self._dx, self._h, self._z = True, None, None, None

    def collect(self, batch: dict[str, Tensor], loss_scale: float) -> dict[str, Tensor]:
        """Per-sample norms of the armed micro-batch; call after its backward, before the update.

        Args:
            batch: the ``input_ids``/``attention_mask``/``labels`` the step ran on.
            loss_scale: ``c`` in ``loss = c * sum_t CE_t`` (what the backward started from).

        Returns:
            The dict ``per_sample_grad_norms`` returns for this batch.
        """
        if self._dx is None or self._z is None:
            raise RuntimeError("collect() needs arm(), then a forward and a backward")
        device = self._z.device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        tg = _Targets(mask, batch["labels"].to(device))
        if self._z.shape[:2] != ids.shape or self._dx.shape[:2] != ids.shape:
            raise RuntimeError(
                f"captured tensors {tuple(self._z.shape)} do not match the batch {tuple(ids.shape)}"
            )
        with torch.no_grad():
            h = self._h[tg.sb, tg.st].float()
            hd = _Head(
                h,
                tg.y,
                tg.scale,
                None,
                None,
                self.chunk_bytes,
                self.method,
                (self._z, tg.sb, tg.st),
            )
            head_sq = torch.zeros(len(tg.n), dtype=torch.float64)
            _run_head(hd, tg.offsets, head_sq)
            row_scale = 1.0 / (float(loss_scale) * tg.n.clamp(min=1).double())
            out = _finish(
                hd, head_sq, self._dx, row_scale, ids, mask, tg, self.emb, self.tied, self.stats
            )
        self._armed, self._dx, self._h, self._z = False, None, None, None
        return out

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def per_sample_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    chunk_bytes: int = 1 << 26,
) -> tuple[Tensor, Tensor]:
    """Forward-only per-sample mean CE (eq. 1) and supervised-token counts, chunked over tokens.

    Used for IFD's ``PPL(answer)``. NaN loss where a sample has no supervised token.
    """
    backbone, emb, head, _ = _parts(model)
    device = emb.weight.device
    ids, mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    sup = supervised_positions(mask, labels)
    sb, st = sup.nonzero(as_tuple=True)
    y = labels[:, 1:][sb, st]
    n = sup.sum(1)
    with frozen_model(model), torch.no_grad():
        hidden = backbone(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        ).last_hidden_state
        h = hidden[sb, st].float()
        del hidden
        w = head.weight.float()
        bias = head.bias.float() if head.bias is not None else None
        step = max(1, chunk_bytes // (4 * w.shape[0]))
        ce = torch.empty(len(y), device=device)
        for s in range(0, len(y), step):
            z = h[s : s + step] @ w.T
            if bias is not None:
                z += bias
            ce[s : s + step] = torch.logsumexp(z, 1) - z.gather(1, y[s : s + step, None]).squeeze(1)
        total = torch.zeros(len(n), dtype=torch.float64, device=device).index_add_(
            0, sb, ce.double()
        )
        loss = (total / n.double()).float().cpu()
    loss[(n == 0).cpu()] = math.nan
    return loss, n.cpu().long()
