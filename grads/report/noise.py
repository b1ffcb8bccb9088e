"""The evaluation's noise floor: which metrics can separate two methods at this scale.

From the runs of ONE method on one domain over several seeds (and the base model's per-item results,
which every run carries): per metric the fine-tuning effect, the spread over seeds and the minimum
detectable difference of a comparison (:func:`grads.evaluation.stats.noise_floor`).
"""

from __future__ import annotations

from grads.evaluation.metrics import ITEM_METRICS

# In order of preference on a tie (ratios within 1 %): bits per byte first, since it does not
# depend on the tokenizer and so compares across model families.
DOMAIN_METRICS = ["domain_bpb", "domain_loss", "domain_acc"]
FORGETTING_METRICS = [
    "general_kl",
    "ref_nll",
    "ref_bpb",
    "text_bpb",
    "general_acc",
    "general_acc_norm",
]


def noise_floor_report(rows: list[dict], k_compare: int = 3) -> tuple[str, dict]:
    """Noise-floor table (Markdown) and numbers from the runs of ONE method on one domain.

    Each row must carry ``items`` (``collect(..., keep_items=True)``); the base model's items come
    with every run. Returns ``(markdown, {"metrics": {name: numbers}, "headline": {...}})``; the
    headline domain / forgetting metric is the one whose fine-tuning effect is largest relative to
    its minimum detectable difference (see :mod:`grads.evaluation.stats`); within 1 % of the best
    ratio, the earlier metric of :data:`DOMAIN_METRICS` / :data:`FORGETTING_METRICS` wins.
    """
    from grads.evaluation.stats import noise_floor

    rows = [r for r in rows if r.get("items")]
    if not rows:
        raise ValueError("no run with per-item results")
    methods = {(r["domain"], r["selector"], r["budget"]) for r in rows}
    if len(methods) != 1:
        raise ValueError(f"noise floor needs the runs of one method on one domain, got {methods}")
    domain, selector, budget = methods.pop()
    rows = sorted(rows, key=lambda r: r["seed"])
    table = {}
    for name in DOMAIN_METRICS + FORGETTING_METRICS:
        part = ITEM_METRICS[name].part
        runs = [r["items"]["tuned"].get(part) for r in rows]
        base = (rows[0]["items"].get("base") or {}).get(part)
        if not all(runs):
            continue
        nf = noise_floor(runs, base, name, k_compare=k_compare)
        if nf is not None:
            table[name] = nf
    head = {}
    for kind, names in (("domain", DOMAIN_METRICS), ("forgetting", FORGETTING_METRICS)):
        ratios = {m: table[m]["ratio"] for m in names if m in table}
        best = max(ratios.values(), default=None)
        head[kind] = next((m for m, r in ratios.items() if r >= 0.99 * best), None)
    lines = [
        f"Noise floor: {domain}, {selector} at {budget}, seeds {[r['seed'] for r in rows]} "
        f"vs the base model; MDD for two methods with {k_compare} seeds each (80 % power, "
        "alpha 0.05). Accuracies in points.\n",
        "| metric | base | tuned (mean) | effect | sd over seeds | CI half-width (vs base) "
        "| MDD | effect / MDD | items |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, nf in table.items():
        sc, dg = (100.0, 2) if ITEM_METRICS[name].num in ("acc", "acc_norm") else (1.0, 4)
        star = " **(headline)**" if name in head.values() else ""
        lines.append(
            f"| {name}{star} | {nf['base'] * sc:.{dg}f} | {nf['mean'] * sc:.{dg}f} "
            f"| {nf['effect'] * sc:+.{dg}f} | {nf['sd_seed'] * sc:.{dg}f} "
            f"| {nf['ci_half_width'] * sc:.{dg}f} | {nf['mdd'] * sc:.{dg}f} "
            f"| {nf['ratio']:.1f} | {nf['n_items']} |"
        )
    return "\n".join(lines) + "\n", {"metrics": table, "headline": head}
