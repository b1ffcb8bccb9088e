"""Throughput of the DeepSpeed trainer step in float32 vs float32 weights + bf16 autocast, side by side.

Two engines train the same model (same LoRA init) on the same fixed batches with the trainer's loss
(``grads.training.token_loss_sum``); one runs ``trainer.autocast=false``, the other
``trainer.autocast=true``. Timed steps alternate between them, so load from other processes hits
both alike. Prints tokens/s for each, the speed-up, and how far the two loss curves drift apart
(same batches, same init: the cost of the lower precision on the optimisation itself).

bf16 autocast is fast on CPUs with AMX / AVX512-BF16 (``lscpu | grep -o 'amx_bf16\\|avx512_bf16'``);
without them it can be slower than float32: measure before setting ``trainer.autocast=true``.

Usage:
    python scripts/bench_precision.py --model smollm2 --batch 8 --seq 256 --steps 6
    python scripts/bench_precision.py --model tiny --steps 4          # seconds, for a smoke check
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/bench_train.py

from bench_train import SMOLLM2, TINY  # noqa: E402  (scripts/ is on sys.path when run as a script)

VARIANTS = {"float32": False, "bf16_autocast": True}


def _engine(model_cfg, autocast: bool, args):
    import torch

    from grads.models import load_model
    from grads.training import (
        TrainerSettings,
        build_engine,
        fill_ds_config,
        load_ds_template,
        prepare_model,
    )

    cfg = {
        "model": model_cfg,
        "seed": 0,
        "trainer": {
            "mode": args.mode,
            "micro_batch_size": args.batch,
            "lr": 1e-4 if args.mode == "lora" else 1e-5,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "autocast": autocast,
        },
        "finetune": {"max_steps": args.steps + args.warmup_steps},
    }
    s = TrainerSettings.from_cfg(cfg, "finetune")
    torch.manual_seed(0)  # the same LoRA init for both engines
    model, tok = load_model(model_cfg, cache_dir=args.cache_dir)
    model = prepare_model(model, s)
    ds = fill_ds_config(load_ds_template(s.ds_config), s, 1, torch.cuda.is_available())
    return build_engine(model, s, ds, s.max_steps, world_size=1), s, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed steps per variant first")
    ap.add_argument("--cache-dir", default=os.environ.get("GRADS_MODEL_DIR", "outputs/models"))
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from grads.training import token_loss_sum
    from grads.training.distributed import ensure_dist

    ensure_dist()
    model_cfg = SMOLLM2 if args.model == "smollm2" else TINY
    engines = {name: _engine(model_cfg, ac, args) for name, ac in VARIANTS.items()}
    tok = engines["float32"][2]
    gen = torch.Generator().manual_seed(0)
    vocab = min(len(tok), engines["float32"][0].module.get_input_embeddings().weight.shape[0])
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(4)]
    n_sup = args.batch * (args.seq - 1)
    times = {name: [] for name in VARIANTS}
    losses = {name: [] for name in VARIANTS}
    for i in range(args.warmup_steps + args.steps):
        ids = batches[i % len(batches)]
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for name, (engine, s, _) in engines.items():  # alternate: load hits both alike
            t0 = time.perf_counter()
            loss = token_loss_sum(engine, b, s.autocast_dtype()) / n_sup
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            losses[name].append(float(loss.detach()))
            if i >= args.warmup_steps:
                times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    tps = {n: tokens / statistics.median(t) for n, t in times.items()}
    print(f"{args.model} {args.mode}, {args.batch} x {args.seq} tokens, {args.steps} steps each")
    print(f"threads: {torch.get_num_threads()}")
    for n in VARIANTS:
        print(f"  {n:14s} {tps[n]:8.1f} tokens/s (median step {statistics.median(times[n]):.2f} s)")
    print(f"speed-up bf16 autocast / float32: {tps['bf16_autocast'] / tps['float32']:.2f}x")
    drift = [abs(a - b) for a, b in zip(losses["float32"], losses["bf16_autocast"], strict=True)]
    print(
        "loss curves (same init and batches): float32 "
        + " ".join(f"{x:.4f}" for x in losses["float32"])
        + "\n                                    autocast "
        + " ".join(f"{x:.4f}" for x in losses["bf16_autocast"])
    )
    print(f"max |loss difference| {max(drift):.4f} (first step {drift[0]:.4f})")


if __name__ == "__main__":
    main()
