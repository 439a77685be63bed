"""infra/grafana and infra/prometheus: the dashboard is importable as it stands and queries only
series `leukoflow metrics` emits, with labels those series carry; the Prometheus example scrapes
node_exporter from the folder its cron line writes `leukoflow metrics --textfile` into."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
import yaml

from leukoflow.cli import app
from leukoflow.present import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "infra/grafana/leukoflow-dashboard.json").read_text())
SCRAPE_TEXT = (ROOT / "infra/prometheus/prometheus.yml").read_text()
PANELS = DASHBOARD["panels"]
SERIES = re.compile(r"\bleukoflow_[a-z_]+")
# The labels each series family carries in the command's output (present/metrics.py).
LABELS = {"outcome", "night", "model_id", "instance", "job"}  # + what Prometheus adds


def exprs(panel: dict) -> list[str]:
    return [target["expr"] for target in panel.get("targets", [])]


def test_the_dashboard_is_importable():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and isinstance(DASHBOARD["schemaVersion"], int)
    ids = [panel["id"] for panel in PANELS]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    cells: set[tuple[int, int]] = set()
    for panel in PANELS:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["id"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["id"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["id"]
        # Overlapping panels import, but Grafana then moves them about: keep the layout exact.
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & mine, f"panel {panel['id']} overlaps another"
        cells |= mine


def test_the_dashboard_queries_only_what_the_command_emits():
    emitted = set(metrics.series_names())
    used = {name for panel in PANELS for expr in exprs(panel) for name in SERIES.findall(expr)}
    assert used <= emitted, used - emitted
    for panel in PANELS:
        for target in panel["targets"]:
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels <= LABELS, (panel["id"], legend_labels)
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


@pytest.mark.parametrize(
    ("topic", "series"),
    [
        ("nights by outcome", "leukoflow_sweeps"),
        ("images per night", "leukoflow_night_images_scored"),
        ("quarantined per night", "leukoflow_night_images_quarantined"),
        ("flagged subjects", "leukoflow_night_subjects_flagged"),
        ("images/s", "leukoflow_night_images_per_second"),
        ("drift", "leukoflow_night_feature_drift"),
        ("hours since last night", "leukoflow_hours_since_last_completed_night"),
        ("model id", "leukoflow_model_info"),
    ],
)
def test_each_topic_has_a_panel(topic, series):
    assert [p for p in PANELS if any(series in SERIES.findall(e) for e in exprs(p))], topic


def test_the_age_turns_red_at_26_hours_and_the_model_is_a_table():
    (age,) = [
        p for p in PANELS if "leukoflow_hours_since_last_completed_night" in " ".join(exprs(p))
    ]
    steps = age["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert {"color": "red", "value": 26} in steps
    assert max(s["value"] for s in steps if s["value"] is not None) == 26
    (model,) = [p for p in PANELS if "leukoflow_model_info" in " ".join(exprs(p))]
    assert model["type"] == "table"


def test_prometheus_scrapes_node_exporter_from_the_folder_the_cron_line_writes():
    config = yaml.safe_load(SCRAPE_TEXT)
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert any(target.endswith(":9100") for target in targets), targets  # node_exporter's port
    folder = re.search(r"--collector\.textfile\.directory=(\S+)", SCRAPE_TEXT).group(1)
    # The comment's cron line spans two lines (a backslash continuation).
    cron = re.search(r"leukoflow metrics (.+?)--textfile\s+(\S+)", SCRAPE_TEXT, re.S)
    assert cron, "no `leukoflow metrics --textfile` line"
    written = Path(cron.group(2))
    # node_exporter reads only *.prom files straight in its folder.
    assert written.parent == Path(folder) and written.suffix == ".prom"
    command = typer.main.get_command(app).commands["metrics"]
    assert "--textfile" in [opt for param in command.params for opt in param.opts]
