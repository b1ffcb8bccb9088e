"""Benchmark the batched per-sample feature pass against a training step and a naive per-sample loop.

Modes, all on the same model and the same fixed batch (random token ids, every token supervised unless
``--prompt-frac`` masks a prefix; the training step always computes full logits, so full supervision is
the feature pass's least favourable case):

* ``train``    one normal training step: forward + backward with weight gradients, all params trainable;
* ``features`` ``grads.features.gradients.per_sample_grad_norms(..., stats=True)`` on the whole batch;
* ``naive``    LESS-style loop: batch size 1, all params trainable, ``loss.backward()``, read the norms of
  the embedding's and LM head's ``.grad``.

Timing: one process, one model, one batch; the modes are interleaved round-robin (``--warmup`` rounds
discarded, median of ``--repeats`` reported, best also kept) so that load from other processes on a
shared machine hits all modes alike.

Memory: torch's CPU tensors are allocated through malloc, which ``tracemalloc`` does not see, and
``ru_maxrss`` is a lifetime high-water mark that model loading can dominate. So each mode also runs
(twice) in a fresh subprocess that loads the model, builds the batch, records its resident set size
(RSS) and samples RSS every ~1 ms from a thread while the mode runs. The reported peak is that
high-water mark minus the pre-run RSS: the extra memory the mode needs on top of the loaded model
(allocations living < 1 ms could be missed; the big buffers here live far longer). ``ru_maxrss`` of
that subprocess is reported alongside.

Usage::

    python scripts/bench_features.py                      # SmolLM2-135M, batch 8, seq 128
    python scripts/bench_features.py --model tiny --repeats 2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = ("train", "features", "naive")


def _load(name: str, cache_dir: str):
    from grads.models import build_tiny, load_model

    if name == "tiny":
        return build_tiny(tied=True)[0]
    return load_model({"source": "gguf", "dtype": "float32"}, cache_dir=cache_dir)[0]


def _batch(vocab: int, batch: int, seq: int, prompt_frac: float, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(prompt_frac * seq)] = -100
    return ids, torch.ones_like(ids), labels


class _RssPeak:
    """Sample this process's RSS from a daemon thread; keep the maximum."""

    def __init__(self, interval: float = 1e-3):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _setup(args):
    """Load the model (all params trainable) and the fixed batch; return the three mode callables."""
    import torch

    from grads.features.gradients import per_sample_grad_norms

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args.model, args.cache_dir)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask, labels = _batch(emb.weight.shape[0], args.batch, args.seq, args.prompt_frac)

    def train():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    def features():
        out = per_sample_grad_norms(model, ids, mask, labels, stats=True)
        return {k: v.tolist() for k, v in out.items()}

    def naive():
        embed, lm_head = [], []
        for i in range(len(ids)):
            model.zero_grad(set_to_none=True)
            model(
                input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], labels=labels[i : i + 1]
            ).loss.backward()
            embed.append(emb.weight.grad.norm().item())
            lm_head.append(head.weight.grad.norm().item())  # the same tensor when tied
        model.zero_grad(set_to_none=True)
        return {"embed": embed, "lm_head": lm_head}

    return {"train": train, "features": features, "naive": naive}


def _memory_worker(args) -> dict:
    """Fresh process, one mode: RSS high-water while it runs, above the RSS of the loaded model."""
    import gc
    import resource

    import psutil

    fn = _setup(args)[args.worker]
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    with _RssPeak() as mem:
        for _ in range(2):  # the first call also pays one-off allocations; count them
            fn()
    return {
        "peak_extra_rss_mib": (mem.peak - rss0) / 2**20,
        "rss_before_mib": rss0 / 2**20,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }


def _time_modes(args, modes: list[str]) -> dict:
    """One process, same model and batch; modes interleaved round-robin so that load from other
    processes on a shared machine hits all of them alike. Median over ``repeats`` after warm-up."""
    import torch

    fns = _setup(args)
    times: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, object] = {}
    for r in range(args.warmup + args.repeats):
        for m in modes:
            t0 = time.perf_counter()
            results[m] = fns[m]()
            if r >= args.warmup:
                times[m].append(time.perf_counter() - t0)
    out = {}
    for m in modes:
        ts = sorted(times[m])
        med = ts[len(ts) // 2]
        out[m] = {
            "times_s": times[m],  # in run order
            "median_s": med,
            "tokens_per_s": args.batch * args.seq / med,
            "best_tokens_per_s": args.batch * args.seq / ts[0],
            "result": results[m],
        }
    out["_threads"] = torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--prompt-frac",
        type=float,
        default=0.0,
        help="fraction of each sequence masked as prompt (labels -100)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--cache-dir", default="outputs/models")
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # child process: memory of one mode, JSON on the last stdout line
        print(json.dumps(_memory_worker(args)))
        return {}

    modes = args.modes.split(",")
    load_before = os.getloadavg()
    runs = _time_modes(args, modes)
    load_after = os.getloadavg()
    threads = runs.pop("_threads")
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    for mode in modes:
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--worker", mode],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"memory run of mode {mode} failed")
        runs[mode].update(json.loads(proc.stdout.strip().splitlines()[-1]))

    header = (
        f"{'mode':<10}{'tokens/s':>10}{'best tok/s':>12}{'s/step':>9}"
        f"{'peak extra RSS MiB':>20}{'ru_maxrss MiB':>15}"
    )
    lines = [
        f"model={args.model} batch={args.batch} seq={args.seq} repeats={args.repeats} "
        f"threads={threads} prompt_frac={args.prompt_frac} "
        f"loadavg(1m) {load_before[0]:.1f}->{load_after[0]:.1f} on {os.cpu_count()} CPUs",
        header,
        "-" * len(header),
    ]
    for mode, r in runs.items():
        lines.append(
            f"{mode:<10}{r['tokens_per_s']:>10.1f}{r['best_tokens_per_s']:>12.1f}"
            f"{r['median_s']:>9.3f}{r['peak_extra_rss_mib']:>20.1f}"
            f"{r['ru_maxrss_mib']:>15.1f}"
        )
    summary = {
        "args": vars(args),
        "threads": threads,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "runs": runs,
    }

    def ratio(a: str, b: str) -> str:
        med = runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"]
        best = runs[a]["best_tokens_per_s"] / runs[b]["best_tokens_per_s"]
        summary[f"{a}_over_{b}"], summary[f"{a}_over_{b}_best"] = med, best
        return f"{a}/{b} tokens/s: {med:.2f}x median, {best:.2f}x best"

    if {"train", "features"} <= runs.keys():
        ok = runs["features"]["peak_extra_rss_mib"] <= runs["train"]["peak_extra_rss_mib"]
        summary["features_peak_le_train"] = ok
        lines.append(f"{ratio('features', 'train')}   features peak <= train peak: {ok}")
    if {"naive", "features"} <= runs.keys():
        feat, ref = runs["features"]["result"], runs["naive"]["result"]
        # Tied: the naive .grad is the shared matrix's total gradient, i.e. our `tied` key.
        pairs = [("tied", "lm_head")] if "tied" in feat else [("embed", "embed"), ("lm_head",) * 2]
        err = max(abs(a - b) / abs(b) for k, r in pairs for a, b in zip(feat[k], ref[r]))
        summary["max_rel_err_vs_naive"] = err
        lines.append(f"{ratio('features', 'naive')}   max rel err vs naive .grad norms: {err:.1e}")
    print("\n".join(lines))
    summary["table"] = lines
    out = Path(args.out) / f"features_{args.model}_b{args.batch}_s{args.seq}_t{threads}.json"
    from grads.io import write_json

    write_json(out, summary)
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
