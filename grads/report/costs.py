"""What a sweep cost: selection next to fine-tuning per method, and minutes per stage."""

from __future__ import annotations

from grads.report.tables import budget_key


def cost_table(df):
    """Selection cost (warm-up + features + select) next to full-data fine-tuning, per domain/method."""
    import pandas as pd

    rows = []
    for (domain, sel), g in df.groupby(["domain", "selector"]):
        full = df[(df["domain"] == domain) & (df["selector"] == "full")]["finetune_s"]
        rows.append(
            {
                "domain": domain,
                "selector": sel,
                "selection_cost_s": round(float(g["selection_cost_s"].mean()), 1),
                "select_stage_s": round(float(g["select_s"].mean()), 1)
                if "select_s" in g
                else None,
                "finetune_s": round(float(g["finetune_s"].mean()), 1),
                "full_finetune_s": round(float(full.mean()), 1) if len(full) else None,
            }
        )
    return pd.DataFrame(rows)


def cost_model(df, exclude: tuple[str, ...] = ()):
    """Minutes per stage and domain: the median over runs of the seconds of the job that computed
    the stage (a cache hit carries them), so one job that shared the machine with other work does
    not set the estimate (one did on financial: a 50 % fine-tune at 19 min beside 11-12).

    Columns: the warm-up epoch, the gradient-norm pass, the IFD pass and the baselines' passes
    (the rest of the features stage), a fine-tune per budget (``full`` = the whole pool), one
    evaluation, and the GrADS selection cost (warm-up + gradient-norm pass) over the full fine-tune.
    Empty when the runs predate the per-stage columns. The selectors in ``exclude`` are left out:
    variants that compute their own warm-up and features (the protocol's cheap-selection variants,
    :data:`grads.paper.protocol.CHEAP_VARIANTS`) would set stages that are not the protocol's
    (their selection cost is in the cost table).
    """
    import pandas as pd

    if "warmup_cached" not in df.columns:
        return pd.DataFrame()
    # their own warm-up and features are not the protocol's
    df = df[~df["selector"].isin(exclude)]

    def minutes(frame, col) -> float | None:
        # One row per run (a computed row before a cache hit of the same run); a cache hit carries
        # the seconds of the job that computed the stage, so runs collected again still count.
        ids = [c for c in ("selector", "budget", "seed") if c in frame]
        runs = frame.sort_values(col.replace("_s", "_cached"), kind="stable")
        values = runs.drop_duplicates(ids)[col].dropna()
        return round(float(values.median()) / 60, 1) if len(values) else None

    rows = []
    for domain, d in df.groupby("domain"):
        # the protocol's one features table: its computing job's seconds (a cache hit carries them)
        feats = d.sort_values("features_cached", kind="stable")
        if "features_gradnorm_s" in d:
            feats = feats.dropna(subset=["features_gradnorm_s", "features_ifd_s"])
        row = {"domain": domain, "warm-up": minutes(d, "warmup_s")}
        if len(feats) and "features_gradnorm_s" in d:
            f = feats.iloc[0]
            grad, ifd = f["features_gradnorm_s"], f["features_ifd_s"]
            row["grad-norm pass"] = round(grad / 60, 1)
            row["IFD pass"] = round(ifd / 60, 1)
            row["baseline passes"] = round((f["features_s"] - grad - ifd) / 60, 1)
        tuned = d[d["selector"] != "full"]
        for budget in sorted(tuned["budget"].unique(), key=budget_key):
            row[f"fine-tune {budget}"] = minutes(tuned[tuned["budget"] == budget], "finetune_s")
        row["fine-tune full"] = minutes(d[d["selector"] == "full"], "finetune_s")
        row["evaluation"] = minutes(d, "evaluate_s")
        if row.get("fine-tune full") and row.get("warm-up") and "grad-norm pass" in row:
            sel = row["warm-up"] + row["grad-norm pass"]
            row["GrADS selection / full FT"] = round(sel / row["fine-tune full"], 2)
        rows.append(row)
    return pd.DataFrame(rows)
