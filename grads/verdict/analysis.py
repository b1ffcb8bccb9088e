"""The verdict from the jobs' per-item results: paired differences, MDD and plain words.

Each job's evaluate stage writes the per-item results of the tuned and the base model
(``<evaluate dir>/metrics.json``, key ``items``); the verdict reads them there and pairs a compared
selector with the reference on the seeds both ran and the items both evaluated
(:func:`grads.evaluation.stats.paired_bootstrap`). The reference's own seeds and the base model give
the run's noise floor (:func:`grads.evaluation.stats.noise_floor`): the minimum detectable
difference (MDD) between two methods with that many seeds, and the effect of fine-tuning itself,
``f(reference) - f(base)``.

Words, from the 95 % CI of (selector - reference):

* held-out domain loss (``domain_bpb``, lower is better): CI below 0 *beats*, above 0 *worse than*,
  across 0 *ties*;
* forgetting (``general_kl``, KL(base || tuned), lower is better): CI above 0 *forgets more*, below 0
  *forgets less*, across 0 *forgets as much*;
* *inconclusive*, for every selector, when the MDD exceeds the effect of fine-tuning on held-out bpb
  (``|reference - base|``): at that size nothing the verdict could find would be told from noise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from grads.evaluation.metrics import ITEM_METRICS
from grads.io import read_json
from grads.verdict.plan import FORGET, LOSS

METRICS = (LOSS, FORGET)
INCONCLUSIVE = "inconclusive"


def job_items(metrics: dict) -> dict:
    """A job's per-item results (``{"tuned": {part: ...}, "base": {...}}``), read from its
    evaluate stage's ``metrics.json``."""
    path = Path(metrics["artefacts"]["evaluate"]) / "metrics.json"
    items = read_json(path).get("items") or {}
    if not items.get("tuned"):
        raise ValueError(f"{path}: no per-item results (was the evaluation skipped?)")
    return items


def _part(items: dict, side: str, metric: str) -> dict | None:
    return (items.get(side) or {}).get(ITEM_METRICS[metric].part) or None


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def compare(compared: dict[int, dict], reference: dict[int, dict], n_boot: int) -> dict:
    """``metric -> {diff, lo, hi, significant, mean, n_seeds, n_items}`` of (compared - reference)
    over the seeds both ran (``None`` where they share no item)."""
    from grads.evaluation.stats import paired_bootstrap

    seeds = sorted(set(compared) & set(reference))
    out: dict[str, dict | None] = {}
    for metric in METRICS:
        a = [_part(compared[s], "tuned", metric) for s in seeds]
        b = [_part(reference[s], "tuned", metric) for s in seeds]
        p = paired_bootstrap(a, b, metric, n_boot=n_boot) if seeds and all(a + b) else None
        if p is None:
            out[metric] = None
            continue
        values = [ITEM_METRICS[metric].value(x) for x in a]
        out[metric] = {
            "diff": p.mean,
            "lo": p.lo,
            "hi": p.hi,
            "significant": p.significant,
            "mean": sum(values) / len(values),
            "n_seeds": p.n_seeds,
            "n_items": p.n_items,
        }
    return out


def floor(reference: dict[int, dict], n_boot: int) -> dict:
    """``metric -> noise-floor numbers`` of the reference's seeds against the base model."""
    from grads.evaluation.stats import noise_floor

    seeds = sorted(reference)
    out: dict[str, dict | None] = {}
    for metric in METRICS:
        runs = [_part(reference[s], "tuned", metric) for s in seeds]
        base = _part(reference[seeds[0]], "base", metric)
        nf = noise_floor(runs, base, metric, k_compare=len(seeds), n_boot=n_boot)
        if nf is not None:
            nf = {k: _finite(v) if isinstance(v, float) else v for k, v in nf.items()}
        out[metric] = nf
    return out


def detectable(nf: dict | None, against: str) -> tuple[bool | None, str]:
    """Whether the run can detect a difference at all: MDD <= |reference - base| on held-out bpb."""
    if not nf:
        return None, "no held-out bpb to judge by"
    mdd, effect = nf.get("mdd"), abs(nf.get("effect") or 0.0)
    if mdd is None:
        return None, "one seed per method: no minimum detectable difference (verdict.seeds >= 2)"
    if mdd > effect:
        return False, (
            f"the pool is too small for this verdict to detect anything: the minimum detectable "
            f"difference ({mdd:.4f} bpb with {nf['n_seeds']} seeds) is larger than the effect of "
            f"fine-tuning itself (|{against} - base| = {effect:.4f} bpb on the held-out split)"
        )
    return True, f"MDD {mdd:.4f} bpb <= |{against} - base| = {effect:.4f} bpb"


def loss_word(r: dict | None, against: str, ok: bool | None) -> str:
    """``beats / ties / worse than <against>`` (or inconclusive)."""
    if r is None or ok is False:
        return INCONCLUSIVE
    if r["hi"] < 0:
        return f"beats {against}"
    return f"worse than {against}" if r["lo"] > 0 else f"ties {against}"


def forget_word(r: dict | None, against: str, ok: bool | None) -> str:
    """``forgets less / as much / more`` (than ``against``; or inconclusive)."""
    if r is None or ok is False:
        return INCONCLUSIVE
    if r["lo"] > 0:
        return "forgets more"
    return "forgets less" if r["hi"] < 0 else "forgets as much"


def _ci(r: dict | None, unit: str) -> str:
    if r is None:
        return "no result"
    return f"{r['diff']:+.4f} {unit}, 95 % CI [{r['lo']:+.4f}, {r['hi']:+.4f}]"


def sentence(row: dict, against: str) -> str:
    """One selector's verdict in words and numbers."""
    loss, forget = row["loss_verdict"], row["forgetting_verdict"]
    head = f"{row['selector']} ({row['n_selected']} samples)"
    if loss == INCONCLUSIVE:
        return (
            f"{head}: inconclusive; {row['detectable_reason']}. Measured vs {against}: held-out "
            f"{_ci(row[LOSS], 'bpb')}; KL {_ci(row[FORGET], 'nats/token')}."
        )
    forget += f" as {against}" if forget == "forgets as much" else f" than {against}"
    return (
        f"{head} {loss} on held-out domain loss ({_ci(row[LOSS], 'bpb')}) and {forget} "
        f"(KL(base||tuned) {_ci(row[FORGET], 'nats/token')})."
    )


def _reference_row(ref: dict, against: str, n_boot: int) -> dict:
    nf = floor(ref["runs"], n_boot)
    ok, why = detectable(nf.get(LOSS), against)
    return {
        "selector": ref["label"],
        "n_selected": ref["n"],
        "seeds": sorted(ref["runs"]),
        "mean": {m: (nf[m] or {}).get("mean") for m in METRICS},
        "base": {m: (nf[m] or {}).get("base") for m in METRICS},
        "effect": {m: (nf[m] or {}).get("effect") for m in METRICS},
        "mdd": {m: (nf[m] or {}).get("mdd") for m in METRICS},
        "detectable": ok,
        "detectable_reason": why,
        "noise_floor": nf,
    }


def assemble(compared: dict[str, dict], references: dict[int, dict], against: str, n_boot: int):
    """The verdict of every compared selector, the references' noise floors and the winner.

    Args:
        compared: label -> ``{"n": subset size, "runs": {seed: items}}``.
        references: subset size -> ``{"label", "n", "runs": {seed: items}}``.
        against: the reference's name, as the words say it.
        n_boot: bootstrap resamples.

    Returns:
        ``{"selectors": [...], "references": [...], "winner": {...}}``.
    """
    refs = {n: _reference_row(ref, against, n_boot) for n, ref in references.items()}
    rows = []
    for label, c in compared.items():
        ref = refs[c["n"]]
        diff = compare(c["runs"], references[c["n"]]["runs"], n_boot)
        ok = ref["detectable"]
        row = {
            "selector": label,
            "n_selected": c["n"],
            "seeds": sorted(c["runs"]),
            LOSS: diff[LOSS],
            FORGET: diff[FORGET],
            "mdd": ref["mdd"],
            "detectable": ok,
            "detectable_reason": ref["detectable_reason"],
            "loss_verdict": loss_word(diff[LOSS], against, ok),
            "forgetting_verdict": forget_word(diff[FORGET], against, ok),
        }
        row["verdict"] = sentence(row, against)
        rows.append(row)
    return {"selectors": rows, "references": list(refs.values()), "winner": winner(rows, refs)}


def winner(rows: list[dict], refs: dict[int, dict]) -> dict:
    """The compared selector that beats the reference by the most on held-out bpb; else the
    reference (at the first compared selector's size): no selection is worth more than it here."""
    beats = [r for r in rows if r["loss_verdict"].startswith("beats")]
    if beats:
        best = min(beats, key=lambda r: r[LOSS]["diff"])
        return {
            "selector": best["selector"],
            "role": "compared",
            "n_selected": best["n_selected"],
            "why": f"{best['selector']} beats the reference by the most on held-out bpb",
        }
    n = rows[0]["n_selected"] if rows else next(iter(refs))
    ref = refs[n]
    return {
        "selector": ref["selector"],
        "role": "reference",
        "n_selected": n,
        "why": f"no compared selector beats {ref['selector']} on held-out bpb",
    }
