"""Batched exact per-sample gradient norms vs a naive per-sample autograd reference (tiny Llamas)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from grads.features.gradients import STAT_KEYS, per_sample_grad_norms, per_sample_loss
from grads.models import build_tiny

torch.set_num_threads(1)
RTOL = 1e-3


def make_samples(tok, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Ragged (input_ids, labels) pairs: prompt masked, one with a single supervised token, one that
    contains the pad id as a real token (its embedding row gets no gradient in nn.Embedding)."""
    g = torch.Generator().manual_seed(seed)
    specs = [(5, 9), (12, 3), (3, 1), (7, 14), (2, 6)]  # (prompt length, response length)
    out = []
    for k, (p, r) in enumerate(specs):
        ids = torch.randint(0, 256, (p + r,), generator=g).tolist()
        if k == 3:
            ids[2] = ids[9] = tok.pad_token_id
            ids[4] = ids[5] = ids[11]  # repeated ids: embedding rows must be aggregated
        out.append((ids, [-100] * p + ids[p:]))
    return out


def pad(samples, pad_id: int, side: str):
    T = max(len(i) for i, _ in samples)
    ids = torch.full((len(samples), T), pad_id)
    lab = torch.full((len(samples), T), -100)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, (i, lbl) in enumerate(samples):
        sl = slice(T - len(i), T) if side == "left" else slice(0, len(i))
        ids[b, sl], lab[b, sl], mask[b, sl] = torch.tensor(i), torch.tensor(lbl), 1
    return ids, mask, lab


def naive_reference(model, samples) -> dict[str, list[float]]:
    """Per-sample autograd on a copy whose E and W are separate Parameters, batch size 1."""
    ref = copy.deepcopy(model).float()
    base = ref.get_base_model() if hasattr(ref, "get_base_model") else ref
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = head.weight is emb.weight
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    emb.weight.requires_grad_(True)
    head.weight.requires_grad_(True)
    res = {k: [] for k in ("loss", "embed", "lm_head", "tied")}
    for ids, lbl in samples:
        ref.zero_grad(set_to_none=True)
        out = ref(input_ids=torch.tensor([ids]), labels=torch.tensor([lbl]))
        out.loss.backward()
        ge, gw = emb.weight.grad, head.weight.grad
        res["loss"].append(out.loss.item())
        res["embed"].append(ge.norm().item())
        res["lm_head"].append(gw.norm().item())
        res["tied"].append((ge + gw).norm().item())
    return res


def snapshot(model):
    return [
        (n, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        for n, p in model.named_parameters()
    ]


def assert_unchanged(model, snap):
    for (n, p), (n0, v0, rg0, g0) in zip(model.named_parameters(), snap):
        assert n == n0 and torch.equal(p.detach(), v0) and p.requires_grad == rg0, n
        assert (p.grad is None) == (g0 is None) and (g0 is None or torch.equal(p.grad, g0)), n


def check(got, ref, tied: bool):
    keys = ["loss", "embed", "lm_head"] + (["tied"] if tied else [])
    assert ("tied" in got) == tied
    for k in keys:
        torch.testing.assert_close(
            got[k].double(), torch.tensor(ref[k], dtype=torch.float64), rtol=RTOL, atol=1e-7, msg=k
        )


@pytest.fixture(scope="module")
def tiny():
    return {t: build_tiny(tied=t) for t in (True, False)}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_naive_reference(tiny, tied, side):
    model, tok = tiny[tied]
    model.train()  # the call must use eval semantics and restore the mode
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)  # pre-existing .grad
    samples = make_samples(tok)
    snap = snapshot(model)
    got = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, side), stats=True)
    assert_unchanged(model, snap)
    assert model.training
    model.lm_head.weight.grad = None
    model.eval()
    check(got, naive_reference(model, samples), tied)
    assert got["n_tokens"].tolist() == [sum(x != -100 for x in lbl[1:]) for _, lbl in samples]
    for k in STAT_KEYS:
        assert got[k].shape == (len(samples),) and torch.isfinite(got[k]).all(), k
    # a single supervised token: the per-token head statistic has no spread
    assert got["head_tok_std"][2] == 0 and got["n_tokens"][2] == 1


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_bytes", [1 << 26, 4 * 259 * 3])  # default; forces the long path
def test_ghost_and_direct_forms_agree(tiny, monkeypatch, tied, chunk_bytes):
    """The two forms of ||G_i^T H_i|| are different computations that must give the same norms.

    (``auto`` picks ghost for every sample of the tiny model, so comparing against it would compare
    ghost with itself: each form is forced here, and a spy proves which branch ran.)
    """
    import grads.features.gradients as gradients

    model, tok = tiny[tied]
    samples = make_samples(tok, seed=1)
    batch = pad(samples, tok.pad_token_id, "right")
    taken: list[bool] = []
    original = gradients._Head.use_ghost

    def spy(self, n):
        taken.append(original(self, n))
        return taken[-1]

    monkeypatch.setattr(gradients._Head, "use_ghost", spy)
    got = {}
    for method in ("ghost", "direct"):
        taken.clear()
        got[method] = per_sample_grad_norms(model, *batch, method=method, chunk_bytes=chunk_bytes)
        assert taken and all(t == (method == "ghost") for t in taken), method
    keys = ("loss", "embed", "lm_head") + (("tied",) if tied else ())
    for k in keys:
        torch.testing.assert_close(got["ghost"][k], got["direct"][k], rtol=1e-4, atol=1e-8, msg=k)
    check(got["direct"], naive_reference(model, samples), tied)


def test_auto_picks_the_cheaper_form():
    """Eq. (2): ghost iff n (V + D) <= V D (tiny: V=259, D=64 -> ghost up to 51 tokens)."""
    from grads.features.gradients import _Head

    h, w = torch.zeros(3, 64), torch.zeros(259, 64)
    head = _Head(h, torch.zeros(3, dtype=torch.long), torch.ones(3), w, None, 1 << 26, "auto")
    assert [head.use_ghost(n) for n in (1, 51, 52, 500)] == [True, True, False, False]


def test_padding_and_batch_invariance(tiny):
    model, tok = tiny[False]
    samples = make_samples(tok, seed=2)
    left = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "left"))
    alone = per_sample_grad_norms(model, *pad(samples[:1], tok.pad_token_id, "right"))
    right = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "right"))
    for k in ("loss", "embed", "lm_head"):
        torch.testing.assert_close(left[k], right[k], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(alone[k][0], right[k][0], rtol=1e-4, atol=1e-8)


def test_first_token_label_is_never_a_target(tiny):
    """Labels = input_ids (as for IFD's answer-only pass): padding must not predict token 0."""
    model, tok = tiny[True]
    samples = [(i, i) for i, _ in make_samples(tok, seed=4)]
    left = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "left"))
    right = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "right"))
    assert left["n_tokens"].tolist() == [len(i) - 1 for i, _ in samples]
    for k in ("loss", "embed", "lm_head", "tied"):
        torch.testing.assert_close(left[k], right[k], rtol=1e-4, atol=1e-8)
    check(right, naive_reference(model, samples), tied=True)


def test_no_supervised_token_gives_nan(tiny):
    model, tok = tiny[True]
    samples = make_samples(tok)[:2]
    samples.append(([5, 6, 7, 8], [-100, -100, -100, -100]))
    samples.append(([9, 10], [-100, 10]))
    got = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "right"), stats=True)
    assert got["n_tokens"].tolist()[2:] == [0, 1]
    for k, v in got.items():
        if k != "n_tokens":
            assert math.isnan(v[2]) and torch.isfinite(v[[0, 1, 3]]).all(), k
    empty = per_sample_grad_norms(model, *pad(samples[2:3], tok.pad_token_id, "right"))
    assert empty["n_tokens"].item() == 0 and math.isnan(empty["embed"].item())


def test_peft_lora(tiny):
    import peft  # a required dependency: a failed import must fail, not skip

    base, tok = build_tiny(tied=True)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    samples = make_samples(tok, seed=3)
    snap = snapshot(model)
    got = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "left"))
    assert_unchanged(model, snap)
    check(got, naive_reference(model, samples), tied=True)


def test_bf16_smoke(tiny):
    model, tok = build_tiny(tied=True, dtype="bfloat16")
    samples = make_samples(tok)
    got = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "right"), stats=True)
    ref = naive_reference(model, samples)  # float32 copy of the same bf16 weights
    for k in ("loss", "embed", "lm_head", "tied"):
        assert got[k].dtype == torch.float32 and torch.isfinite(got[k]).all()
        torch.testing.assert_close(
            got[k].double(), torch.tensor(ref[k], dtype=torch.float64), rtol=0.1, atol=0, msg=k
        )


def test_per_sample_loss_matches(tiny):
    model, tok = tiny[False]
    samples = make_samples(tok)
    batch = pad(samples, tok.pad_token_id, "left")
    loss, n = per_sample_loss(model, *batch, chunk_bytes=4 * 259 * 5)
    full = per_sample_grad_norms(model, *batch)
    torch.testing.assert_close(loss, full["loss"], rtol=1e-5, atol=1e-7)
    assert torch.equal(n, full["n_tokens"])


@pytest.mark.smoke
def test_smollm2_matches_naive_reference():
    """Real model: SmolLM2-135M (tied, V=49152) batched features vs per-sample autograd."""
    from grads.models import load_model

    model, tok = load_model({"source": "gguf", "dtype": "float32"}, cache_dir="outputs/models")
    g = torch.Generator().manual_seed(0)
    samples = []
    for p, r in [(6, 10), (9, 4)]:
        ids = torch.randint(0, tok.vocab_size, (p + r,), generator=g).tolist()
        samples.append((ids, [-100] * p + ids[p:]))
    snap = snapshot(model)
    got = per_sample_grad_norms(model, *pad(samples, tok.pad_token_id, "left"))
    assert_unchanged(model, snap)
    check(got, naive_reference(model, samples), tied=True)


# --------------------------------------------------------------------------------------------------
# GradNormRecorder: the same norms read off a training step (issue 15)
# --------------------------------------------------------------------------------------------------
def _recorded(model, batch, c: float, **kw) -> dict:
    from grads.features.gradients import GradNormRecorder
    from grads.training import token_loss_sum

    rec = GradNormRecorder(model, **kw)
    rec.arm()
    b = dict(zip(("input_ids", "attention_mask", "labels"), batch))
    (c * token_loss_sum(model, b)).backward()
    got = rec.collect(b, c)
    rec.close()
    return got


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("lora", [False, True])
def test_recorder_equals_pass(tied, lora):
    """Train-mode forward + backward of a scaled summed loss gives the pass's numbers (rtol 1e-5)."""
    model, tok = build_tiny(tied=tied)
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )
    else:
        model.requires_grad_(True)
    model.train()
    samples = make_samples(tok, seed=5)
    batch = pad(samples, tok.pad_token_id, "right")
    want = per_sample_grad_norms(model, *batch, stats=True)
    # An arbitrary loss scale and method: the recorder must undo the trainer's normalisation.
    got = _recorded(model, batch, 0.37, stats=True, chunk_bytes=4 * 259 * 3)
    assert got.keys() == want.keys() and ("tied" in got) == tied
    assert torch.equal(got["n_tokens"], want["n_tokens"])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # The hooks are gone: a later forward is untouched (no leaf made, nothing captured).
    out = model(input_ids=batch[0][:1])
    assert out.logits.shape[0] == 1


def test_recorder_needs_a_backward(tiny):
    from grads.features.gradients import GradNormRecorder

    model, tok = tiny[True]
    rec = GradNormRecorder(model)
    rec.arm()
    with pytest.raises(RuntimeError, match="backward"):
        rec.collect(
            dict(
                zip(
                    ("input_ids", "attention_mask", "labels"),
                    pad(make_samples(tok), tok.pad_token_id, "right"),
                )
            ),
            1.0,
        )
    rec.close()
