"""The W&B report builder, offline: blocks, panels and run filters are checked; nothing is saved."""

from __future__ import annotations

import importlib.util
import json

import pytest
import wandb_workspaces.reports.v2 as wr  # a dev dependency (setup.cfg [dev])

from tests.conftest import REPO


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "wandb_report", REPO / "scripts" / "wandb_report.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def no_network(monkeypatch):
    """Any server call fails the test; saving is refused."""
    from wandb_workspaces.reports.v2 import interface

    def refuse(*args, **kwargs):
        raise AssertionError("the report builder tried to reach the W&B server")

    monkeypatch.setattr(interface, "execute_graphql", refuse)
    monkeypatch.setattr(interface, "_get_api", refuse)
    monkeypatch.setattr(interface.Report, "save", refuse)
    return interface


def _panels(report, grid_index):
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    return grids[grid_index].panels


def test_report_for_a_sweep_group(script, no_network):
    report = script.build_report(
        "me", "grads", "hpo_finetune", objective="domain_loss", tags=["medical"]
    )
    assert (report.entity, report.project, report.title) == (
        "me",
        "grads",
        "GrADS sweep: hpo_finetune",
    )
    heads = [b.text for b in report.blocks if isinstance(b, wr.H1)]
    assert heads == ["Results", "Hyperparameters", "Selection", "Cost"]
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 4
    for grid in grids:  # every grid shows exactly the sweep's runs
        (rs,) = grid.runsets
        assert (rs.entity, rs.project, rs.name) == ("me", "grads", "hpo_finetune")
        assert (
            rs.filters == "Metric(\"Group\") == 'hpo_finetune' and Metric(\"Tags\") in ['medical']"
        )
    results = _panels(report, 0)
    assert [type(p).__name__ for p in results] == ["ScatterPlot", "BarPlot", "BarPlot", "BarPlot"]
    assert results[0].x == wr.SummaryMetric("forgetting") and results[0].y == wr.SummaryMetric(
        "domain_gain"
    )
    assert [p.metrics[0].name for p in results[1:]] == ["domain_acc", "general_acc", "forgetting"]
    assert all(p.groupby == "config.selector.name" for p in results[1:])
    parallel, scatter, importance = _panels(report, 1)
    assert [c.metric for c in parallel.columns] == [
        wr.Config("finetune.lr"),
        wr.Config("finetune.lora.r"),
        wr.Config("budget.value"),
        wr.SummaryMetric("domain_loss"),
    ]
    assert scatter.x == wr.Config("finetune.lr") and scatter.log_x
    assert importance.with_respect_to == "domain_loss"
    (media,) = _panels(report, 2)
    assert media.media_keys == ["selection"]  # the key grads.pipeline logs the selection plot under


def test_report_spec_serialises_with_the_project_lookup_faked(script, no_network, monkeypatch):
    # Converting to the saved spec needs the project's internal id from the server: fake that one
    # answer, so everything but the upload is checked.
    calls = []

    def fake_graphql(api, query, variables):
        calls.append(variables)
        return {"project": {"internalId": "UHJvamVjdDox"}}

    monkeypatch.setattr(no_network, "execute_graphql", fake_graphql)
    monkeypatch.setattr(no_network, "_get_api", lambda: None)
    report = script.build_report("me", "grads", "paper_main")
    spec = json.loads(report._to_model().model_dump_json(by_alias=True))
    assert spec["displayName"] == "GrADS sweep: paper_main"
    assert calls and all(c == {"entityName": "me", "projectName": "grads"} for c in calls)
    grids = [b["metadata"] for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"]
    assert len(grids) == 4
    for grid in grids:
        (rs,) = grid["runSets"]
        assert rs["project"] == {"name": "grads", "entityName": "me", "id": "UHJvamVjdDox"}
        (flt,) = rs["filters"]["filters"]
        assert (flt["key"], flt["op"], flt["value"]) == (
            {"section": "run", "name": "group"},
            "=",
            "paper_main",
        )
        assert rs["grouping"] == [{"section": "config", "name": "selector.value.name"}]
    views = [[p["viewType"] for p in g["panelBankSectionConfig"]["panels"]] for g in grids]
    assert views[0] == ["Scatter Plot", "Bar Chart", "Bar Chart", "Bar Chart"]
    assert views[1] == ["Parallel Coordinates Plot", "Scatter Plot", "Parameter Importance"]
    first = grids[0]["panelBankSectionConfig"]["panels"]
    assert first[0]["config"]["xAxis"] == "summary:forgetting"
    assert first[1]["config"]["metrics"] == ["summary_metrics.domain_acc"]


def test_dry_run_prints_the_outline_and_saves_nothing(script, no_network, capsys):
    script.main(
        ["--entity", "me", "--group", "hpo_finetune", "--param", "finetune.lr", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "report: GrADS sweep: hpo_finetune (me/grads)"
    assert "panel ParallelCoordinatesPlot: domain_bpb by knob" in out
    assert out.count("runset hpo_finetune: filters Metric(\"Group\") == 'hpo_finetune'") == 4
