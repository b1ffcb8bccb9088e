"""Per-sample representations for the targeted baselines, computed once and stored memory-mapped.

Two passes, each run by the features stage only when a selector asks for it (or the experiment
lists it in ``features.representations``), over the pool and, for targeted selectors, the domain's
target set (:mod:`grads.data.targets`):

* ``lora_grads`` (LESS, Xia et al. 2024, "LESS: Selecting Influential Data for Targeted
  Instruction Tuning"). The gradient of each sample's mean token loss with respect to the LoRA
  parameters of the warm-up model (its saved adapter, unmerged). Per-sample gradients are exact and
  batched: for a LoRA pair ``y += s B A x`` the gradient of ``L_i`` is
  ``dL_i/dA = sum_t e_t x_t^T`` and ``dL_i/dB = sum_t d_t (A x_t)^T`` with ``e_t``, ``d_t`` the
  gradients at the outputs of ``A`` and ``B``; samples do not interact, so one backward of
  ``sum_i L_i`` gives every ``e_t``, ``d_t`` and no weight gradient is formed. Pool gradients are
  Adam-preconditioned as in LESS when the warm-up's optimizer state is available
  (``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``, ``g~ = m' / sqrt(v' + eps)``, no bias
  correction, as the LESS code does); target gradients are plain (LESS's "sgd" type). Each vector is
  randomly projected to ``proj_dim`` dimensions and unit-normalised.
* ``hidden`` (RDS+, Ivison et al. 2025, "Large-Scale Data Selection for Instruction Tuning"). The
  final hidden states of the *base* model, mean-pooled with weights proportional to the position
  (SGPT's weighted mean: token ``t = 1..n`` weighs ``t / sum(1..n)``, padding excluded), over the
  whole chat-formatted sample (prompt and response).

**Projection.** ``rademacher``: a dense matrix of independent ``+-1/sqrt(d)`` entries, the
projection LESS uses (through TRAK), generated block by block from seeded ``torch.Generator``
streams (one stream per block of parameter rows) so the result does not depend on batching.
Generating ``P x d`` signs per projected chunk is cheap on a GPU and slow on a CPU, so the CPU
default is ``countsketch``: each parameter coordinate goes to one seeded bucket with a seeded sign
(a sparse JL transform; inner products are preserved in expectation like the dense one, with a
somewhat larger variance for spiky vectors), O(P) per sample. ``auto`` picks ``rademacher`` with
``proj_dim: 8192`` (LESS's setting) on CUDA and ``countsketch`` with 1024 dimensions on CPU; the
resolved values are part of the features cache key.

**Storage.** ``<features dir>/representations/<name>/``: ``pool.npy`` (float32 ``[n, d]``, opened
with ``np.load(mmap_mode="r")``), ``pool_ids.json``, and with a target set ``target.npy``,
``target_ids.json``, ``target_groups.json``; ``meta.json`` records the model, projection,
preconditioning (``adam`` or ``sgd`` and why), shapes and timings. Samples without a supervised
token have a NaN row (LESS) and are excluded by the selectors.

**Resuming.** The pool passes run in chunks of ``features.chunk_size`` samples; each finished chunk
is saved in the attempt folder (``representations.chunks/<name>/``) and each finished pass is
stored at once, so an attempt stopped during the passes (a kill, the end of a job's time) resumes
from what it finished. A pool that fits one chunk runs in one piece, as before.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grads.features.store import (
    REP_CHUNK_DIR,
    PoolChunks,
    finished_representation,
    write_representation,
)

log = logging.getLogger(__name__)

PASSES = ("lora_grads", "hidden")
DEFAULTS: dict[str, dict[str, Any]] = {
    "lora_grads": {
        "proj_dim": "auto",  # 8192 on CUDA (LESS), 1024 on CPU
        "projection": "auto",  # rademacher on CUDA, countsketch on CPU
        "seed": 0,
        "adam": "auto",  # auto: Adam-preconditioned when the warm-up optimizer state exists
        "batch_size": 8,
        "buffer_bytes": 1
        << 28,  # dense projection: per-sample gradients buffered before projecting
        "block_rows": 1 << 15,  # dense projection: parameter rows per generated block
    },
    "hidden": {"pooling": "weighted_mean", "batch_size": 8},
}
POOLINGS = ("weighted_mean", "mean", "last")
PROJECTIONS = ("rademacher", "countsketch")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
def resolve_pass(name: str, overrides: dict | None = None, cuda: bool | None = None) -> dict:
    """The concrete settings of pass ``name``: defaults, then ``overrides``, ``auto`` resolved.

    Raises:
        ValueError: an unknown pass or knob, or a bad value (named).
    """
    if name not in DEFAULTS:
        raise ValueError(f"features.representations: unknown pass {name!r}; expected {PASSES}")
    unknown = sorted(set(overrides or {}) - set(DEFAULTS[name]))
    if unknown:
        raise ValueError(
            f"features.{name}: unknown knob(s) {unknown}; known: {sorted(DEFAULTS[name])}"
        )
    out = {**DEFAULTS[name], **(overrides or {})}
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if name == "lora_grads":
        if out["projection"] == "auto":
            out["projection"] = "rademacher" if cuda else "countsketch"
        if out["proj_dim"] == "auto":
            out["proj_dim"] = 8192 if cuda else 1024
        if out["projection"] not in PROJECTIONS:
            raise ValueError(f"features.lora_grads.projection must be one of {PROJECTIONS}")
        if int(out["proj_dim"]) < 1:
            raise ValueError(f"features.lora_grads.proj_dim must be >= 1, got {out['proj_dim']}")
        if out["adam"] not in ("auto", True, False):
            raise ValueError("features.lora_grads.adam must be auto, true or false")
        out["proj_dim"] = int(out["proj_dim"])
    elif out["pooling"] not in POOLINGS:
        raise ValueError(f"features.hidden.pooling must be one of {POOLINGS}")
    return out


# --------------------------------------------------------------------------------------------------
# Per-sample LoRA gradients
# --------------------------------------------------------------------------------------------------
def lora_parameters(model) -> list[tuple[str, Any]]:
    """``(name, parameter)`` of every LoRA matrix of a peft model, in ``named_parameters`` order."""
    params = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if not params:
        raise ValueError("the model has no LoRA parameters (expected a peft LoRA model)")
    return params


def _lora_modules(model) -> list[tuple[str, Any]]:
    """The ``nn.Linear`` behind each LoRA parameter, aligned with :func:`lora_parameters`."""
    modules = dict(model.named_modules())
    out = []
    for name, _ in lora_parameters(model):
        mod_name = name.rsplit(".", 1)[0]  # strip ".weight"
        mod = modules[mod_name]
        if getattr(mod, "bias", None) is not None:
            raise NotImplementedError(f"{mod_name}: LoRA with a bias is not supported")
        out.append((name, mod))
    return out


def per_sample_lora_grads(model, input_ids, attention_mask, labels):
    """Exact per-sample gradients of the mean supervised-token loss w.r.t. the LoRA matrices.

    One forward over the batch (eval mode: no dropout) and one backward of ``sum_i L_i`` with
    respect to the LoRA modules' *outputs* only; each sample's weight gradient is then the sum of
    outer products of its output gradients and inputs (module docstring). The model's flags and
    ``.grad`` fields are left untouched.

    Args:
        model: a peft LoRA causal LM.
        input_ids, attention_mask, labels: ``[B, T]`` batch (``-100`` where no loss is taken;
            HF's shift: logits at ``t`` predict ``labels[t + 1]``).

    Returns:
        ``(grads, n_tokens)``: float32 ``[B, P]`` on the model's device in the order of
        :func:`lora_parameters` (each matrix flattened row-major) and int64 ``[B]`` supervised
        counts. A sample with no supervised token has a zero row.
    """
    import torch

    from grads.features.gradients import frozen_model, position_ids_from_mask, supervised_positions

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone, head = base.get_decoder(), base.get_output_embeddings()
    mods = _lora_modules(model)
    device = head.weight.device
    ids, mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    sup = supervised_positions(mask, labels)
    sb, st = sup.nonzero(as_tuple=True)
    y = labels[:, 1:][sb, st]
    n = sup.sum(1)
    saved: dict[int, tuple[Any, Any]] = {}

    def hook(i):
        def fn(_mod, inputs, output):
            saved[i] = (inputs[0].detach(), output)

        return fn

    with frozen_model(model):
        handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(mods)]
        try:
            embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
            with torch.enable_grad():
                h = backbone(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                ).last_hidden_state
                logits = head(h[sb, st]).float()
                ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                scale = (1.0 / n.clamp(min=1).float())[sb]
                total = (ce * scale).sum()
        finally:
            for hd in handles:
                hd.remove()
        outs = [saved[i][1] for i in range(len(mods))]
        grads_out = torch.autograd.grad(total, outs, allow_unused=True) if len(y) else None
    B = ids.shape[0]
    cols = []
    for i in range(len(mods)):
        x, out = saved[i]
        g = grads_out[i] if grads_out is not None else None
        if g is None:
            g = torch.zeros_like(out)
        # [B, T, out] x [B, T, in] -> [B, out, in]: the Linear weight's per-sample gradient.
        cols.append(torch.einsum("bto,bti->boi", g.float(), x.float()).reshape(B, -1))
    return torch.cat(cols, dim=1), n.cpu().long()


def adam_precondition(g, m, v, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8):
    """LESS's Adam update direction for gradient rows ``g`` given optimizer moments ``m``, ``v``.

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``, returns ``m' / sqrt(v' + eps)``
    (eps inside the root and no bias correction, as in LESS's ``obtain_gradients_with_adam``).
    """
    b1, b2 = float(betas[0]), float(betas[1])
    m2 = g * (1.0 - b1) + m * b1
    v2 = g.square() * (1.0 - b2) + v * b2
    return m2 / (v2 + eps).sqrt()


def find_adam_state(warmup_dir: str | Path, model) -> tuple[Any, Any, dict]:
    """The warm-up's Adam moments flattened in :func:`lora_parameters` order, if they were kept.

    Reads the latest resumable checkpoint (``checkpoints/latest``, kept only with
    ``trainer.clean_checkpoints=false``) written by DeepSpeed without ZeRO partitioning
    (``mp_rank_00_model_states.pt`` holding a torch optimizer state). Its optimizer groups list the
    trainable matrices before the vectors, each in ``named_parameters`` order
    (``grads.training.param_groups``), which is how indices are mapped back to names.

    Returns:
        ``(m, v, info)``; ``m`` and ``v`` are ``None`` when no usable state exists, and
        ``info["reason"]`` says why.
    """
    import torch

    root = Path(warmup_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None, None, {"reason": "no checkpoint kept (trainer.clean_checkpoints=true)"}
    ckpt = root / pointer.read_text().strip()
    files = sorted(ckpt.rglob("mp_rank_00_model_states.pt"))
    if not files:
        return None, None, {"reason": f"no DeepSpeed model state under {ckpt}"}
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    opt = state.get("optimizer") or {}
    if "state" not in opt or "param_groups" not in opt:
        return None, None, {"reason": "optimizer state is ZeRO-partitioned (not supported)"}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ordered = [n for n, p in trainable if p.ndim >= 2] + [n for n, p in trainable if p.ndim < 2]
    index = {n: i for i, n in enumerate(ordered)}
    ms, vs = [], []
    for name, p in lora_parameters(model):
        s = opt["state"].get(index.get(name, -1))
        if s is None or tuple(s["exp_avg"].shape) != tuple(p.shape):
            return None, None, {"reason": f"optimizer state does not match parameter {name}"}
        ms.append(s["exp_avg"].float().reshape(-1))
        vs.append(s["exp_avg_sq"].float().reshape(-1))
    meta = {}
    if (ckpt / "meta.json").exists():
        meta = json.loads((ckpt / "meta.json").read_text())
    info = {
        "checkpoint": ckpt.name,
        "step": meta.get("step"),
        "total_steps": meta.get("total_steps"),
    }
    return torch.cat(ms), torch.cat(vs), info


# --------------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------------
class Projector:
    """A seeded random projection of ``P``-dim gradient rows to ``proj_dim`` (module docstring).

    Args:
        sizes: number of coordinates of each parameter tensor (the row layout of the input).
        proj_dim: output dimension ``d``.
        kind: ``rademacher`` (dense +-1/sqrt(d)) or ``countsketch`` (one signed bucket per coordinate).
        seed: base seed; parameter tensor ``j``, block ``b`` draws from ``seed, j, b``.
        device: where the projection is generated and applied.
        block_rows: coordinates per generated dense block (bounds its memory to ``block_rows x d``).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        proj_dim: int,
        kind: str = "rademacher",
        seed: int = 0,
        device: Any = "cpu",
        block_rows: int = 1 << 15,
    ):
        import torch

        if kind not in PROJECTIONS:
            raise ValueError(f"projection kind must be one of {PROJECTIONS}, got {kind!r}")
        self.sizes, self.d, self.kind = [int(s) for s in sizes], int(proj_dim), kind
        self.seed, self.device, self.block_rows = int(seed), torch.device(device), int(block_rows)
        self.dim = sum(self.sizes)
        self._sketch = self._countsketch() if kind == "countsketch" else None

    def _blocks(self):
        """``(start, stop, generator seed)`` of every block of the concatenated coordinates."""
        start = 0
        for j, size in enumerate(self.sizes):
            for b, lo in enumerate(range(0, size, self.block_rows)):
                hi = min(size, lo + self.block_rows)
                yield start + lo, start + hi, (self.seed * 1_000_003 + j) * 65_537 + b
            start += size

    def _countsketch(self):
        import torch

        buckets = torch.empty(self.dim, dtype=torch.long)
        signs = torch.empty(self.dim, dtype=torch.float32)
        g = torch.Generator()
        for lo, hi, s in self._blocks():
            g.manual_seed(s)
            buckets[lo:hi] = torch.randint(0, self.d, (hi - lo,), generator=g)
            signs[lo:hi] = torch.randint(0, 2, (hi - lo,), generator=g).float() * 2 - 1
        return buckets.to(self.device), signs.to(self.device)

    def project(self, grads):
        """Project float rows ``[N, P]`` to ``[N, d]`` (float32, on the projector's device)."""
        import torch

        grads = grads.to(self.device, torch.float32)
        if grads.shape[1] != self.dim:
            raise ValueError(f"expected rows of {self.dim} coordinates, got {grads.shape[1]}")
        out = torch.zeros(grads.shape[0], self.d, device=self.device)
        if self._sketch is not None:
            buckets, signs = self._sketch
            return out.index_add_(1, buckets, grads * signs)
        g = torch.Generator(device=self.device)
        for lo, hi, s in self._blocks():
            g.manual_seed(s)
            r = torch.empty(hi - lo, self.d, device=self.device).bernoulli_(0.5, generator=g)
            r.mul_(2.0).sub_(1.0)
            out.addmm_(grads[:, lo:hi], r)
        return out.mul_(1.0 / math.sqrt(self.d))


# --------------------------------------------------------------------------------------------------
# Passes over a list of tokenised samples
# --------------------------------------------------------------------------------------------------
def _batches(samples: Sequence[dict], batch_size: int, progress: str | None = None):
    """Longest-first batches of ``(positions, samples)`` (little padding, stable order).

    ``progress``: the description of a tqdm bar (samples done, rate, ETA), or ``None`` for none.
    The bar advances when the caller asks for the next batch, i.e. after a batch is processed.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]["input_ids"]), i))
    bar = tqdm(
        total=len(order),
        desc=progress,
        unit="sample",
        disable=progress is None,
        dynamic_ncols=True,
    )
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            yield idx, [samples[i] for i in idx]
            bar.update(len(idx))
    finally:
        bar.close()


def lora_grad_matrix(
    model,
    samples: Sequence[dict],
    pad_id: int,
    projector: Projector,
    batch_size: int = 8,
    adam: tuple[Any, Any, Sequence[float], float] | None = None,
    buffer_bytes: int = 1 << 28,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Projected, unit-normalised LoRA gradients of ``samples`` (rows in input order).

    Args:
        model: peft LoRA model (eval mode is set for the pass).
        samples: dicts with ``input_ids`` and ``labels``.
        pad_id: padding token id (right padding).
        projector: the shared :class:`Projector` (pool and target must use the same one).
        batch_size: samples per forward/backward.
        adam: ``(m, v, betas, eps)`` to Adam-precondition (LESS's pool gradients) or ``None``.
        buffer_bytes: dense projection: per-sample gradients are buffered up to this size so each
            generated projection block serves many samples.
        progress: description of the progress bar (``None``: no bar).

    Returns:
        ``(matrix, norms)``: float32 ``[n, d]`` unit rows (NaN for samples without supervised
        tokens) and the float64 norm of each projected row before normalisation.
    """
    import torch

    from grads.data.pool import collate

    n, d = len(samples), projector.d
    out = np.full((n, d), np.nan, dtype=np.float32)
    norms = np.full(n, np.nan)
    per_row = projector.dim * 4
    cap = 1 if projector.kind == "countsketch" else max(1, int(buffer_bytes) // per_row)
    pending: list[tuple[list[int], Any, Any]] = []

    def flush() -> None:
        if not pending:
            return
        pos = [p for idx, _, _ in pending for p in idx]
        proj = projector.project(torch.cat([g for _, g, _ in pending]))
        ok = torch.cat([k for _, _, k in pending]).cpu().numpy()
        nrm = torch.linalg.vector_norm(proj, dim=1)
        unit = (proj / nrm.clamp(min=1e-30)[:, None]).cpu().numpy()
        for j, p in enumerate(pos):
            if ok[j] and float(nrm[j]) > 0:
                out[p], norms[p] = unit[j], float(nrm[j])
        pending.clear()

    buffered = 0
    for idx, batch in _batches(samples, batch_size, progress):
        b = collate(batch, pad_id, "right")
        g, n_tok = per_sample_lora_grads(model, **b)
        if adam is not None:
            m, v, betas, eps = adam
            g = adam_precondition(g, m.to(g.device), v.to(g.device), betas, eps)
        pending.append((idx, g, n_tok > 0))
        buffered += len(idx)
        if buffered >= cap:
            flush()
            buffered = 0
    flush()
    return out, norms


def pooled_hidden(model, input_ids, attention_mask, pooling: str = "weighted_mean"):
    """Pooled final hidden states ``[B, D]`` (float32) of a causal LM; padding never counts.

    ``weighted_mean``: SGPT / RDS+ position weights ``t / sum(1..n)`` over the ``n`` attended
    tokens; ``mean``: uniform; ``last``: the last attended token.
    """
    import torch

    from grads.features.gradients import position_ids_from_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = base.get_input_embeddings().weight.device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    with torch.no_grad():
        h = base.get_decoder()(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        ).last_hidden_state.float()
    m = mask.float()
    if pooling == "last":
        last = (mask.long().cumsum(1) * mask).argmax(1)
        return h[torch.arange(h.shape[0], device=device), last]
    w = m * m.cumsum(1) if pooling == "weighted_mean" else m
    w = w / w.sum(1, keepdim=True).clamp(min=1e-30)
    return torch.einsum("bt,btd->bd", w, h)


def hidden_matrix(
    model,
    samples: Sequence[dict],
    pad_id: int,
    batch_size: int = 8,
    pooling: str = "weighted_mean",
    progress: str | None = None,
) -> np.ndarray:
    """:func:`pooled_hidden` of every sample, float32 ``[n, D]`` in input order (not normalised);
    ``progress``: description of the progress bar (``None``: no bar)."""
    from grads.data.pool import collate

    out: np.ndarray | None = None
    for idx, batch in _batches(samples, batch_size, progress):
        b = collate(batch, pad_id, "right")
        rep = pooled_hidden(model, b["input_ids"], b["attention_mask"], pooling).cpu().numpy()
        if out is None:
            out = np.zeros((len(samples), rep.shape[1]), dtype=np.float32)
        out[idx] = rep
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Stage entry point
# --------------------------------------------------------------------------------------------------
def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lora_model(cfg: dict, warmup_dir: str | Path):
    """The warm-up model with its LoRA adapter *unmerged* (trainable), and where the LoRA came from.

    A LoRA warm-up saved ``adapter/``: base model + that adapter, as LESS takes gradients of its
    warm-up LoRA. A full fine-tuning warm-up has none: a fresh LoRA (``trainer.lora`` knobs, seeded
    with the warm-up seed) is put on the warm-up weights, whose ``B = 0`` makes ``dL/dA`` zero and
    ``dL/dB`` a seeded sketch of the full weight gradient (documented deviation from LESS).
    """
    import torch
    from peft import PeftModel

    from grads.models import load_model
    from grads.training import TrainerSettings, load_trained, prepare_model

    cache = (cfg.get("paths") or {}).get("model_dir")
    adapter = Path(warmup_dir) / "adapter"
    if (adapter / "adapter_config.json").exists():
        base, tok = load_model(cfg["model"], cache_dir=cache)
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        source = "warm-up LoRA adapter"
    else:
        warm, tok = load_trained(cfg["model"], warmup_dir, cache_dir=cache)
        s = TrainerSettings.from_cfg(
            {**cfg, "trainer": {**cfg["trainer"], "mode": "lora"}}, "warmup"
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s.seed))
            model = prepare_model(warm, s)
        source = "fresh seeded LoRA on the full warm-up weights (the warm-up saved no adapter)"
    model.to(_device()).eval()
    return model, tok, source


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _bar_label(cfg: dict, what: str):
    """``part -> bar description`` for a pass over ``part`` (pool or target), or ``None`` for no
    bar: bars are shown on rank 0 when ``features.progress`` is on, as the features pass does."""
    from grads.dist import rank

    show = bool((cfg.get("features") or {}).get("progress", True)) and rank() == 0
    return lambda part: f"{what} ({part})" if show else None


def _lora_pass(
    cfg: dict, warmup_dir, pool: list[dict], target: list[dict] | None, s: dict, chunks: PoolChunks
):
    """LESS's gradient features of pool (Adam-preconditioned when possible) and target (plain)."""
    from grads.features.store import Representation
    from grads.training import TrainerSettings

    t0 = time.perf_counter()
    model, tok, source = lora_model(cfg, warmup_dir)
    params = lora_parameters(model)
    proj = Projector(
        [p.numel() for _, p in params],
        s["proj_dim"],
        s["projection"],
        s["seed"],
        _device(),
        s["block_rows"],
    )
    adam, info = None, {"reason": "features.lora_grads.adam=false"}
    if s["adam"] is not False:
        m, v, info = find_adam_state(warmup_dir, model)
        if m is None and s["adam"] is True:
            raise FileNotFoundError(f"features.lora_grads.adam=true but {info['reason']}")
        if m is not None:
            ws = TrainerSettings.from_cfg(cfg, "warmup")
            adam = (m, v, ws.betas, ws.eps)
    t_load = time.perf_counter() - t0
    kw = {"batch_size": int(s["batch_size"]), "buffer_bytes": int(s["buffer_bytes"])}
    bar = _bar_label(cfg, "LESS LoRA gradients")

    def pool_part(samples, label):
        return lora_grad_matrix(model, samples, _pad_id(tok), proj, adam=adam, progress=label, **kw)

    (pool_m, pool_norm, resumed), t_pool = timed(
        chunks.run, "lora_grads", pool, pool_part, bar("pool")
    )
    tgt_m, t_tgt = None, 0.0
    if target is not None:
        (tgt_m, _), t_tgt = timed(
            lora_grad_matrix, model, target, _pad_id(tok), proj, progress=bar("target"), **kw
        )
    meta = {
        "lora_source": source,
        "n_lora_params": proj.dim,
        "proj_dim": proj.d,
        "projection": proj.kind,
        "seed": s["seed"],
        "preconditioning": "adam" if adam is not None else "sgd",
        "adam_state": info,
        "target_preconditioning": "sgd",
        "checkpoints": 1,
        "pool_norm_median": float(np.nanmedian(pool_norm))
        if np.isfinite(pool_norm).any()
        else None,
        "timings_s": {"load": t_load, "pool": t_pool, "target": t_tgt},
        "n_resumed": resumed,
    }
    return Representation(
        "lora_grads",
        np.array([r["id"] for r in pool], dtype=object),
        pool_m,
        *_target_parts(target, tgt_m),
        meta=meta,
    )


def _target_parts(target: list[dict] | None, matrix):
    if target is None:
        return None, None, None
    ids = np.array([r["id"] for r in target], dtype=object)
    groups = np.array([r.get("source", "target") for r in target], dtype=object)
    return ids, matrix, groups


def _hidden_pass(
    cfg: dict, pool: list[dict], target: list[dict] | None, s: dict, chunks: PoolChunks
):
    """RDS+'s representation: pooled final hidden states of the *base* model."""
    from grads.features.store import Representation
    from grads.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(cfg["model"], cache_dir=(cfg.get("paths") or {}).get("model_dir"))
    model.to(_device()).eval()
    t_load = time.perf_counter() - t0
    kw = {"batch_size": int(s["batch_size"]), "pooling": s["pooling"]}
    bar = _bar_label(cfg, "RDS+ hidden states")

    def pool_part(samples, label):
        return hidden_matrix(model, samples, _pad_id(tok), progress=label, **kw), None

    (pool_m, _, resumed), t_pool = timed(chunks.run, "hidden", pool, pool_part, bar("pool"))
    tgt_m, t_tgt = (
        (None, 0.0)
        if target is None
        else timed(hidden_matrix, model, target, _pad_id(tok), progress=bar("target"), **kw)
    )
    meta = {
        "model": "base",
        "pooling": s["pooling"],
        "dim": int(pool_m.shape[1]),
        "timings_s": {"load": t_load, "pool": t_pool, "target": t_tgt},
        "n_resumed": resumed,
    }
    return Representation(
        "hidden",
        np.array([r["id"] for r in pool], dtype=object),
        pool_m,
        *_target_parts(target, tgt_m),
        meta=meta,
    )


def run_passes(cfg: dict, warmup_dir: str | Path, pool, out_dir: str | Path) -> dict:
    """Run the passes listed in ``cfg["features"]["representations"]`` and store them.

    Args:
        cfg: resolved config; ``features.representations`` (pass names), ``features.<pass>``
            (settings, already resolved by the pipeline) and ``features.target`` (truthy: embed
            the domain's target set too).
        warmup_dir: the warm-up stage folder (adapter, optional optimizer checkpoint).
        pool: the tokenised pool (``datasets.Dataset`` or list of dicts).
        out_dir: the features stage folder; results go to ``representations/<pass>/``.

    Returns:
        ``{pass: meta}`` (also written next to each matrix).
    """
    feats = cfg.get("features") or {}
    names = list(feats.get("representations") or [])
    if not names:
        return {}
    rows = [{"id": str(r["id"]), "input_ids": r["input_ids"], "labels": r["labels"]} for r in pool]
    target = None
    summary: dict[str, Any] = {}
    if feats.get("target"):
        from grads.data.targets import tokenized_target
        from grads.models import load_model

        tok = load_model(cfg["model"], cache_dir=(cfg.get("paths") or {}).get("model_dir"))[1]
        target, tsum = tokenized_target(cfg, tok)
        summary["target"] = tsum
    chunks = PoolChunks(Path(out_dir) / REP_CHUNK_DIR, feats.get("chunk_size"))
    for name in names:
        done = finished_representation(Path(out_dir) / "representations" / name, rows)
        if done is not None:  # an attempt stopped during a later pass stored this one
            log.info("representation %s: reusing the interrupted attempt's finished pass", name)
            summary[name] = done
            continue
        s = resolve_pass(name, feats.get(name))
        rep = (
            _lora_pass(cfg, warmup_dir, rows, target, s, chunks)
            if name == "lora_grads"
            else _hidden_pass(cfg, rows, target, s, chunks)
        )
        rep.meta.update(settings=s, target=summary.get("target"))
        write_representation(Path(out_dir) / "representations" / name, rep)
        summary[name] = rep.meta
        log.info(
            "representation %s: %s in %.1fs",
            name,
            rep.pool.shape,
            sum(rep.meta["timings_s"].values()),
        )
    chunks.remove()  # every pass is stored
    return summary


def resolve_features_representations(cfg: dict, feats: dict, selector: Any) -> dict:
    """The features config with the representation passes (and target set) this run needs.

    ``features.representations``: ``auto``/absent (default) runs only the passes the selector
    declares; an explicit list (an experiment sharing one features stage across selectors) runs
    those plus the selector's. The target set is embedded when the selector requires it, or when
    the list is explicit and the domain declares one (unless ``features.target: false``). The
    resolved settings and the target spec become part of ``features`` and so of its cache key; a
    run that needs no pass leaves ``features`` (and its key) exactly as it was.

    Raises:
        TargetConfigError: the selector needs a target set and the domain declares none (raised
            here, before the warm-up is trained).
    """
    from grads.data.targets import TargetConfigError, spec_key, target_spec
    from grads.selectors.base import traits

    t = traits(selector)
    listed = feats.get("representations", "auto")
    explicit = listed not in (None, "auto")
    names = list(dict.fromkeys([*(listed if explicit else []), *t.representations]))
    if not names:
        feats.pop("representations", None)
        return feats
    spec = target_spec(cfg)
    if t.requires_target and spec is None:
        raise TargetConfigError(
            f"selector {getattr(selector, 'name', selector)!r} needs a target set but domain "
            f"'{(cfg.get('domain') or {}).get('name')}' declares none (domain.target)"
        )
    feats["representations"] = names
    for name in names:
        feats[name] = resolve_pass(name, feats.get(name))
    want = t.requires_target or (explicit and spec is not None and feats.get("target") is not False)
    feats["target"] = spec_key(spec) if want else None
    return feats


def run_stage_passes(cfg: dict, warmup_dir: str | Path, pool, out_dir: str | Path) -> dict:
    """:func:`run_passes` on rank 0 (others wait), writing ``representations.json`` beside them."""
    from grads.dist import barrier, rank
    from grads.io import write_json

    info: dict = {}
    if rank() == 0:
        info = run_passes(cfg, warmup_dir, pool, out_dir)
        write_json(Path(out_dir) / "representations.json", info)
    barrier()
    return info


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0
