"""Build a W&B report for one sweep group with the ``wandb-workspaces`` Reports API (online only).

Each grads job is one W&B run with ``group`` = the sweep and tags domain/selector/budget/model, and
logs ``domain_acc``, ``general_acc``, ``domain_gain``, ``forgetting`` and per-stage costs to its
summary. This script lays those out as the paper's views: a runs table, gain vs forgetting, and
accuracy by selector. It needs network access and ``pip install wandb-workspaces``; offline runs
must be uploaded first (``wandb sync outputs/wandb/offline-run-*``).

Usage:
    python scripts/wandb_report.py --entity ME --project grads --group paper_main
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entity", required=True)
    ap.add_argument("--project", default="grads")
    ap.add_argument("--group", required=True, help="the sweep's group (experiment name)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as exc:
        raise SystemExit(
            "this script needs `pip install wandb-workspaces` (and network access)"
        ) from exc

    runset = wr.Runset(
        entity=args.entity,
        project=args.project,
        name=args.group,
        query=args.group,  # run names/groups matching the sweep; refine the filter in the UI if needed
        groupby=["selector"],
    )
    metrics = ["domain_acc", "general_acc", "domain_gain", "forgetting", "selection_cost_s"]
    report = wr.Report(
        entity=args.entity,
        project=args.project,
        title=args.title or f"GrADS sweep: {args.group}",
        description="Learn more (domain gain), forget less (general accuracy lost), per selector and budget.",
        blocks=[
            wr.H1("Results"),
            wr.P("One point per run; runs are grouped by selector and budget (mean over seeds)."),
            wr.PanelGrid(
                runsets=[runset],
                panels=[
                    wr.ScatterPlot(
                        title="domain gain vs forgetting", x="forgetting", y="domain_gain"
                    ),
                    wr.BarPlot(title="domain accuracy", metrics=["domain_acc"], groupby="selector"),
                    wr.BarPlot(
                        title="general accuracy", metrics=["general_acc"], groupby="selector"
                    ),
                    wr.BarPlot(title="forgetting", metrics=["forgetting"], groupby="selector"),
                ],
            ),
            wr.H1("Cost"),
            wr.PanelGrid(
                runsets=[runset],
                panels=[
                    wr.BarPlot(
                        title="selection cost (s)", metrics=["selection_cost_s"], groupby="selector"
                    )
                ],
            ),
        ],
    )
    report.save()
    print(f"report saved: {report.url}  (metrics: {', '.join(metrics)})")


if __name__ == "__main__":
    main()
