"""Throughput of the DeepSpeed trainer step vs a plain PyTorch loop, in one process.

Both loops train the same model (LoRA or full) on the same fixed batches with the same loss
(``grads.training.token_loss_sum``), AdamW parameter groups, warm-up + cosine schedule and gradient
clipping; DeepSpeed runs the filled ``conf/trainer/ds/cpu.json`` (ZeRO-0, torch AdamW on CPU).
Timed steps alternate between the two loops in rounds, so load from other processes on a shared
machine hits both alike. Prints tokens/s for each and DeepSpeed's overhead in percent.

Usage:
    python scripts/bench_train.py --model tiny --mode full --batch 8 --seq 128 --steps 20
    python scripts/bench_train.py --model smollm2 --mode lora --batch 8 --seq 128 --steps 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Before torch loads libgomp: threads that wait at a barrier sleep instead of spinning. On a
# shared, oversubscribed CPU the default spin made the same training step 4-10x slower in wall
# time and inflated its CPU time as much (measured in bench_cost's notes); idle, it costs ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from grads.models import model_config

SMOLLM2 = model_config("smollm2_135m")  # the same node `grads model=smollm2_135m` composes
TINY = {
    "name": "tiny",
    "source": "tiny",
    "tied": True,
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


def deepspeed_step_throughput(
    model_cfg: dict,
    mode: str,
    batch: int = 8,
    seq: int = 128,
    steps: int = 4,
    warmup_steps: int = 1,
    cache_dir: str | None = None,
    ds_config: str = "ds/cpu.json",
    save_to: str | None = None,
) -> dict:
    """Tokens/s of the trainer's DeepSpeed step alone on fixed ``batch x seq`` random batches.

    The same engine, loss and knobs as ``main``'s DeepSpeed loop (no plain loop): the reference
    that ``scripts/bench_cost.py`` puts beside the pipeline's warm-up throughput. With
    ``save_to``, also times one resumable checkpoint (``grads.training.Checkpoints.save``).
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from grads.models import load_model
    from grads.training import (
        TrainerSettings,
        build_engine,
        fill_ds_config,
        load_ds_template,
        prepare_model,
        token_loss_sum,
    )
    from grads.training.distributed import ensure_dist

    ensure_dist()
    cfg = {
        "model": model_cfg,
        "seed": 0,
        "trainer": {
            "mode": mode,
            "ds_config": ds_config,
            "micro_batch_size": batch,
            "lr": 1e-4 if mode == "lora" else 1e-5,
            "weight_decay": 0.01,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        },
        "finetune": {"max_steps": steps + warmup_steps},
    }
    s = TrainerSettings.from_cfg(cfg, "finetune")
    torch.manual_seed(0)
    model, tok = load_model(model_cfg, cache_dir=cache_dir)
    model = prepare_model(model, s)
    ds = fill_ds_config(load_ds_template(s.ds_config), s, 1, torch.cuda.is_available())
    engine = build_engine(model, s, ds, s.max_steps, world_size=1)
    gen = torch.Generator().manual_seed(0)
    vocab = min(len(tok), model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(engine.device)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times, cpu = [], 0.0
    for i in range(steps + warmup_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = token_loss_sum(engine, b) / (batch * (seq - 1))
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        float(loss.detach())
        if i >= warmup_steps:
            times.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
    save_s = None
    if save_to is not None:
        from grads.training import Checkpoints

        t0 = time.perf_counter()
        Checkpoints(save_to).save(engine, 1, {}, exclude_frozen=mode == "lora", rank=0)
        save_s = time.perf_counter() - t0
    del engine, model
    return {
        "save_s": save_s,
        "tokens_per_s": batch * seq * len(times) / sum(times),
        "median_tokens_per_s": batch * seq / statistics.median(times),
        "tokens_per_cpu_s": batch * seq * len(times) / cpu,  # load-robust on a shared machine
        "step_s": times,
        "batch": batch,
        "seq": seq,
        "mode": mode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--mode", choices=["lora", "full"], default="full")
    parser.add_argument(
        "--batch", type=int, default=8, help="micro-batch size (sequences per step)"
    )
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per loop")
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="alternate the loops this many times (default: every step)",
    )
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps per loop first")
    parser.add_argument("--ds-config", default="ds/cpu.json")
    parser.add_argument("--cache-dir", default=os.environ.get("GRADS_MODEL_DIR", "outputs/models"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from grads.models import load_model
    from grads.training import (
        TrainerSettings,
        build_engine,
        fill_ds_config,
        load_ds_template,
        make_scheduler,
        param_groups,
        prepare_model,
        token_loss_sum,
        warmup_steps_for,
    )
    from grads.training.distributed import ensure_dist

    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_dist()  # DeepSpeed wants a (1-rank) process group even in one process
    model_cfg = SMOLLM2 if args.model == "smollm2" else TINY
    cfg = {
        "model": model_cfg,
        "seed": 0,
        "trainer": {
            "mode": args.mode,
            "ds_config": args.ds_config,
            "micro_batch_size": args.batch,
            "lr": 1e-4 if args.mode == "lora" else 1e-5,
            "weight_decay": 0.01,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        },
        "finetune": {"max_steps": args.steps + args.warmup_steps},
    }
    s = TrainerSettings.from_cfg(cfg, "finetune")
    total = s.max_steps

    def fresh():
        torch.manual_seed(0)  # same LoRA init for both loops
        model, tok = load_model(model_cfg, cache_dir=args.cache_dir)
        return prepare_model(model, s), tok

    plain, tok = fresh()
    opt = torch.optim.AdamW(param_groups(plain, s.weight_decay), lr=s.lr, betas=s.betas, eps=s.eps)
    sched = make_scheduler(opt, total, warmup_steps_for(s, total), s.min_lr_ratio)
    ds_model, _ = fresh()
    ds_config = fill_ds_config(load_ds_template(s.ds_config), s, 1, torch.cuda.is_available())
    engine = build_engine(ds_model, s, ds_config, total, world_size=1)
    device = engine.device
    plain.to(device)

    gen = torch.Generator().manual_seed(0)
    vocab = min(len(tok), plain.get_input_embeddings().weight.shape[0])
    batches = []
    for _ in range(4):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": ids.to(device),
            }
        )
    n_sup = args.batch * (args.seq - 1)
    n_params = sum(p.numel() for p in plain.parameters() if p.requires_grad)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def plain_step(b):
        loss = token_loss_sum(plain, b) / n_sup
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), s.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def ds_step(b):
        loss = token_loss_sum(engine, b) / n_sup
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        return float(loss.detach())

    times = {"plain": [], "deepspeed": []}
    losses = {"plain": [], "deepspeed": []}
    for name, fn in (("plain", plain_step), ("deepspeed", ds_step)):
        for i in range(args.warmup_steps):
            losses[name].append(fn(batches[i % len(batches)]))
    rounds = args.rounds or args.steps
    per_round = [
        args.steps // rounds + (1 if r < args.steps % rounds else 0) for r in range(rounds)
    ]
    step = args.warmup_steps
    for k in per_round:
        for name, fn in (("plain", plain_step), ("deepspeed", ds_step)):
            for j in range(k):
                sync()
                t0 = time.perf_counter()
                losses[name].append(fn(batches[(step + j) % len(batches)]))
                sync()
                times[name].append(time.perf_counter() - t0)
        step += k

    tokens = args.batch * args.seq
    print(
        f"model={args.model} mode={args.mode} batch={args.batch} seq={args.seq} steps={args.steps} "
        f"trainable_params={n_params:,} device={device} threads={torch.get_num_threads()} "
        f"ds_config={args.ds_config}"
    )
    tps, med = {}, {}
    for name in ("plain", "deepspeed"):
        total_t = sum(times[name])
        tps[name] = tokens * len(times[name]) / total_t
        med[name] = statistics.median(times[name])
        print(
            f"{name:>9}: {tps[name]:10.1f} tokens/s mean, "
            f"{tokens / med[name]:10.1f} tokens/s median "
            f"(step {total_t / len(times[name]):.3f} s mean, {med[name]:.3f} s median; "
            f"final loss {losses[name][-1]:.4f})"
        )
    overhead_med = (med["deepspeed"] / med["plain"] - 1.0) * 100.0
    overhead_mean = (tps["plain"] / tps["deepspeed"] - 1.0) * 100.0
    # The median is the headline: on a shared machine, neighbours' load lands as outlier steps.
    print(
        f"DeepSpeed overhead vs plain loop: {overhead_med:+.1f}% (median step time; "
        f"{overhead_mean:+.1f}% on mean step time; target <= 10%)"
    )
    drift = max(abs(a - b) for a, b in zip(losses["plain"], losses["deepspeed"], strict=True))
    print(f"max |loss_plain - loss_deepspeed| over the run: {drift:.2e} (same maths -> ~0)")


if __name__ == "__main__":
    main()
