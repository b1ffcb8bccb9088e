"""One optimizer step (the loss normalised by the global batch's supervised tokens) and the loop
over steps with logging and checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from grads.constants import IGNORE_INDEX
from grads.training.checkpoints import Checkpoints
from grads.training.distributed import all_reduce_sum
from grads.training.settings import LOG_NAME


def _collate_fn() -> Callable:
    from grads.data.pool import collate

    return collate


def token_loss_sum(model, batch: dict, autocast=None):
    """Summed next-token cross-entropy over supervised tokens (labels != -100), in float32.

    Returns the sum, not the mean: the caller divides by the global batch's supervised-token count.
    ``autocast``: a dtype (``torch.bfloat16``) to run the model's forward under ``torch.autocast``
    (``TrainerSettings.autocast_dtype``); the loss is computed in float32 either way.
    """
    import torch
    import torch.nn.functional as F

    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def supervised_count(labels: Sequence[int]) -> int:
    """Supervised targets of one sample: labels after the first (shifted out) that are not -100."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


class StepLoop:
    """What one optimizer step needs: the engine, the plan, the data and the optional recorder."""

    def __init__(self, engine, s, plan, pool, rows, n_tok, n_sup, tokenizer, recording):
        from grads import dist

        self.engine, self.s, self.plan, self.pool, self.rows = engine, s, plan, pool, rows
        self.n_tok, self.n_sup, self.recording = n_tok, n_sup, recording
        self.rank, self.world = dist.rank(), dist.world_size()
        self.collate = _collate_fn()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.dummy = {"input_ids": [self.pad_id], "labels": [IGNORE_INDEX]}
        self.autocast = s.autocast_dtype()

    def step(self, step: int) -> dict:
        """Run optimizer step ``step`` (0-based) on this rank; return its training-log row."""
        import torch

        engine, plan, rec = self.engine, self.plan, self.recording
        t0 = time.perf_counter()
        batch = plan.step_batch(step)
        n_sup_global = sum(self.n_sup[i] for i in batch)
        n_tok_global = sum(self.n_tok[i] for i in batch)
        padded = plan.padded_tokens(batch, self.n_tok)
        # DeepSpeed averages gradients over ranks: multiply by the world size so the update is
        # sum(token losses) / supervised tokens of the global batch.
        scale = self.world / max(1, n_sup_global)
        lr = engine.get_lr()[0]
        local_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
        for micro in plan.micro_batches(batch, self.rank):
            samples = [self.pool[self.rows[i]] for i in micro] or [self.dummy]
            b = {k: v.to(engine.device) for k, v in self.collate(samples, self.pad_id).items()}
            want = rec.wanted(micro, step) if rec is not None else []
            if want:
                rec.arm()
            loss_sum = token_loss_sum(engine, b, self.autocast)
            if not micro:
                loss_sum = loss_sum * 0.0
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            if want:  # before engine.step(): the norms belong to the weights of the forward
                rec.collect(b, scale, micro, want)
            engine.step()
            local_sum += loss_sum.detach()  # a tensor: no device sync per micro-batch
        loss = all_reduce_sum(float(local_sum)) / max(1, n_sup_global)
        dt = time.perf_counter() - t0
        return {
            "step": step + 1,
            "epoch": step // plan.steps_per_epoch,
            "loss": loss,
            "lr": lr,
            "tokens": n_tok_global,
            "padded_tokens": padded,
            "padding_efficiency": n_tok_global / max(1, padded),
            "supervised_tokens": n_sup_global,
            "tokens_per_s": n_tok_global / dt,
            "step_time_s": dt,
            "grad_norm": _grad_norm(engine),
        }


def train_loop(
    loop: StepLoop,
    use: str,
    out: Path,
    ckpts: Checkpoints,
    fingerprint: str,
    total: int,
    log_fn: Callable | None,
    resume: dict,
    first_loss: float | None,
) -> dict:
    """Steps ``resume["start"]..total-1`` with logging and checkpoints; returns segment totals."""
    from grads.io import append_jsonl

    s, rank, start = loop.s, loop.rank, int(resume["start"])
    pbar = None
    if rank == 0:
        from tqdm import tqdm

        pbar = tqdm(total=total, initial=start, desc=use, unit="step", dynamic_ncols=True)
    seg = {"tokens": 0, "padded": 0, "loss": float("nan"), "stopped": False, "done": start}
    seg_t0, cpu_t0 = time.perf_counter(), time.process_time()
    try:
        for step in range(start, total):
            row = loop.step(step)
            done = seg["done"] = step + 1
            seg["loss"] = row["loss"]
            seg["tokens"] += row["tokens"]
            seg["padded"] += row["padded_tokens"]
            first_loss = row["loss"] if first_loss is None else first_loss
            if rank == 0:
                append_jsonl(out / LOG_NAME, row)
                pbar.update(1)
                pbar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{row['lr']:.2e}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    pad=f"{row['padding_efficiency']:.2f}",
                )
                if log_fn is not None and (done % s.log_every == 0 or done == total):
                    log_fn({f"{use}/{k}": v for k, v in row.items() if k != "step"}, done)
            if s.save_every and done % s.save_every == 0 and done < total:
                meta = {
                    "fingerprint": fingerprint,
                    "seed": s.seed,
                    "world_size": loop.world,
                    "global_batch": loop.plan.global_batch,
                    "total_steps": total,
                    "elapsed_s": resume["elapsed_s"] + time.perf_counter() - seg_t0,
                    "tokens": resume["tokens"] + seg["tokens"],
                }
                rec = loop.recording
                extra = {"recorded": rec.gather()} if rec is not None else None
                ckpts.save(
                    loop.engine,
                    done,
                    meta,
                    exclude_frozen=s.mode == "lora",
                    rank=rank,
                    keep=s.keep_checkpoints,
                    extra=extra,
                )
            if s.stop_after_steps is not None and done >= s.stop_after_steps and done < total:
                seg["stopped"] = True
                break
    finally:
        if pbar is not None:
            pbar.close()
    seg["seg_time"] = time.perf_counter() - seg_t0
    seg["cpu_s"] = time.process_time() - cpu_t0  # all threads: a load-robust cost on shared CPUs
    seg["first_loss"] = first_loss
    return seg


def _grad_norm(engine) -> float | None:
    gn = engine.get_global_grad_norm()
    if gn is None:
        return None
    return float(gn.item() if hasattr(gn, "item") else gn)
