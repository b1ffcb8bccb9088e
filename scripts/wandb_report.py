"""Build a W&B report for one sweep group with the ``wandb-workspaces`` Reports API.

Each grads job is one W&B run with ``group`` = the sweep (``experiment``'s ``group``) and tags
domain/selector/budget/model; its summary holds ``domain_acc``, ``general_acc``, ``domain_gain``,
``forgetting``, ``selection_cost_s`` and the per-stage costs, and its media the selection plot. The
report shows, for the runs of that group only (a ``Group`` filter, optionally narrowed by tags):

* Results: domain gain vs forgetting (one point per run), domain / general accuracy and forgetting
  by selector, and the runs table;
* Hyperparameters (sweeps, e.g. ``experiment=hpo_finetune``): parallel coordinates of the searched
  knobs against the objective, the objective against the fine-tune learning rate, and W&B's
  parameter-importance panel;
* Selection: the selection plots (score histogram, KDE, threshold) side by side;
* Cost: selection cost and per-stage wall time.

Building needs no network (``--dry-run`` prints the outline and saves nothing); saving does, and
the runs must be on the server first: ``wandb sync outputs/wandb/offline-run-*``.

Usage:
    python scripts/wandb_report.py --entity ME --project grads --group hpo_finetune
    python scripts/wandb_report.py --entity ME --group paper_main --tag medical --dry-run
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

# The searched knobs of conf/experiment/hpo_*.yaml, as W&B config keys (nested with dots).
DEFAULT_PARAMS = ("finetune.lr", "finetune.lora.r", "budget.value")
RESULT_METRICS = ("domain_acc", "general_acc", "domain_gain", "forgetting")
COST_METRICS = (
    "selection_cost_s",
    "cost/warmup/wall_s",
    "cost/features/wall_s",
    "cost/select/wall_s",
    "cost/finetune/wall_s",
)


def _wr():
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as exc:
        raise SystemExit("this script needs `pip install wandb-workspaces`") from exc
    return wr


def runset(entity: str, project: str, group: str, tags: Sequence[str] = ()):
    """The runs of one sweep group (W&B ``Group`` filter, plus every tag in ``tags``)."""
    import wandb_workspaces.expr as ex

    wr = _wr()
    filters = [ex.Metric("Group") == group]
    filters += [ex.Tags().isin([t]) for t in tags]
    return wr.Runset(
        entity=entity,
        project=project,
        name=group,
        filters=filters,
        groupby=["config.selector.name"],
    )


def build_report(
    entity: str,
    project: str,
    group: str,
    objective: str = "domain_bpb",
    params: Sequence[str] = DEFAULT_PARAMS,
    tags: Sequence[str] = (),
    title: str | None = None,
):
    """The report object for ``group`` (not saved: call ``.save()`` with network access)."""
    wr = _wr()
    rs = runset(entity, project, group, tags)

    def grid(*panels):
        return wr.PanelGrid(runsets=[rs], panels=list(panels))

    def by_selector(metric: str):
        return wr.BarPlot(
            title=metric, metrics=[wr.SummaryMetric(metric)], groupby="config.selector.name"
        )

    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(p)) for p in params]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(objective)))
    return wr.Report(
        entity=entity,
        project=project,
        title=title or f"GrADS sweep: {group}",
        description="Learn more (domain gain), forget less (general accuracy lost): one point per run.",
        blocks=[
            wr.H1("Results"),
            wr.P(f"Runs of group '{group}'; bars average the runs of each selector (over seeds)."),
            grid(
                wr.ScatterPlot(
                    title="domain gain vs forgetting",
                    x=wr.SummaryMetric("forgetting"),
                    y=wr.SummaryMetric("domain_gain"),
                ),
                *(by_selector(m) for m in ("domain_acc", "general_acc", "forgetting")),
            ),
            wr.H1("Hyperparameters"),
            wr.P(f"Objective: {objective}. Each line is one trial of the sweep."),
            grid(
                wr.ParallelCoordinatesPlot(title=f"{objective} by knob", columns=columns),
                wr.ScatterPlot(
                    title=f"{objective} vs fine-tune lr",
                    x=wr.Config("finetune.lr"),
                    y=wr.SummaryMetric(objective),
                    log_x=True,
                ),
                wr.ParameterImportancePlot(with_respect_to=objective),
            ),
            wr.H1("Selection"),
            grid(wr.MediaBrowser(title="selection plots", media_keys=["selection"])),
            wr.H1("Cost"),
            grid(
                wr.BarPlot(
                    title="selection cost (s)",
                    metrics=[wr.SummaryMetric(m) for m in COST_METRICS],
                    groupby="config.selector.name",
                )
            ),
        ],
    )


def outline(report) -> list[str]:
    """One line per block / panel: what the report holds, for ``--dry-run`` and the tests."""
    lines = [f"report: {report.title} ({report.entity}/{report.project})"]
    for block in report.blocks:
        kind = type(block).__name__
        if kind == "PanelGrid":
            for rs in block.runsets:
                lines.append(f"  runset {rs.name}: filters {rs.filters!s}")
            lines += [
                f"  panel {type(p).__name__}: {getattr(p, 'title', '')}" for p in block.panels
            ]
        else:
            lines.append(f"{kind}: {getattr(block, 'text', '')}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entity", required=True)
    ap.add_argument("--project", default="grads")
    ap.add_argument("--group", required=True, help="the sweep's group (experiment name)")
    ap.add_argument("--objective", default="domain_bpb", help="the sweep's objective.metric")
    ap.add_argument("--param", action="append", help="searched config key (repeatable)")
    ap.add_argument("--tag", action="append", default=[], help="keep runs with this tag too")
    ap.add_argument("--title", default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the outline; save nothing")
    args = ap.parse_args(argv)
    report = build_report(
        args.entity,
        args.project,
        args.group,
        objective=args.objective,
        params=args.param or DEFAULT_PARAMS,
        tags=args.tag,
        title=args.title,
    )
    print("\n".join(outline(report)))
    if not args.dry_run:
        report.save()
        print(f"report saved: {report.url}")


if __name__ == "__main__":
    main()
