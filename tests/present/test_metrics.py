"""`leukoflow metrics`: the store's nights in the Prometheus text format, read back with
prometheus_client's own parser; the textfile for node_exporter (the Grafana dashboard's checks
are in tests/infra/test_grafana.py)."""

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_dashboard import MRN, START, busy_row, sweep_row

from leukoflow.learn import calibration, train
from leukoflow.present import metrics
from leukoflow.store import registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import open_location
from leukoflow.store.tables import write_run

ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, parsed by prometheus_client."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def save_current_model(root, model_id: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    y = (x[:, 0] > 0).astype(int)
    model = calibration.fit_calibrated("linear-svm", x, y, train.kfold(y, [None] * 30, 3))
    record = ModelRecord(model_id, feature_recipe={"backbones": ["vgg16"]}, threshold=0.5)
    registry.save_model(root, model_id, model, record)
    registry.promote(root, model_id)


@pytest.fixture
def store(tmp_path):
    root = open_location(str(tmp_path / "store"))
    for day in range(3):  # three completed nights: 4, 5 and 6 cells of one flagged subject
        night = (START + timedelta(days=day)).date().isoformat()
        write_run(root, sweep_row(night, START + timedelta(days=day), f"run-{day}", 4 + day))
    # Night 4: a failed sweep and one that found the store busy, none completed.
    failed_at = START + timedelta(days=3)
    write_run(root, busy_row("2026-03-04", failed_at, "run-failed", "failed"))
    write_run(root, busy_row("2026-03-04", failed_at + timedelta(minutes=1), "run-busy", "busy"))
    return root


def test_the_nights_parse_and_say_what_the_store_holds(store, capsys):
    save_current_model(store, "m-current")
    data = metrics.read_store_nights(store)
    now = START + timedelta(days=4)
    got = samples(metrics.exposition(data, now))
    assert got[("leukoflow_sweeps", (("outcome", "completed"),))] == 3
    assert got[("leukoflow_sweeps", (("outcome", "failed"),))] == 1
    assert got[("leukoflow_sweeps", (("outcome", "busy"),))] == 1
    assert got[("leukoflow_sweeps", (("outcome", "timed_out"),))] == 0
    # The last completed sweep finished 20 s after 2026-03-03 02:00; now is 03-05 02:00.
    hours = got[("leukoflow_hours_since_last_completed_night", ())]
    assert hours == pytest.approx(48 - 20 / 3600, abs=1e-3)
    assert got[("leukoflow_model_info", (("model_id", "m-current"),))] == 1
    night = (("night", "2026-03-02"),)
    assert got[("leukoflow_night_images_scored", night)] == 5 + 2  # the flagged one's + H3's
    assert got[("leukoflow_night_images_flagged", night)] == 5
    assert got[("leukoflow_night_subjects_flagged", night)] == 1
    assert got[("leukoflow_night_subjects", night)] == 2
    assert got[("leukoflow_night_images_quarantined", night)] == 1
    assert got[("leukoflow_night_images_per_second", night)] == pytest.approx(5 / 20)
    assert got[("leukoflow_night_feature_drift", night)] == pytest.approx(0.3)
    assert got[("leukoflow_night_completed", (("night", "2026-03-04"),))] == 0
    # No subject id, raw or keyed, in any label.
    text = metrics.exposition(data, now)
    assert MRN not in text and "S-" not in text and "H3" not in text


def test_an_empty_store_has_no_nights_and_no_age(tmp_path):
    root = open_location(str(tmp_path))
    got = samples(metrics.exposition(metrics.read_store_nights(root), START))
    assert got[("leukoflow_sweeps", (("outcome", "completed"),))] == 0
    assert not [name for name, _ in got if name.startswith("leukoflow_night_")]
    assert ("leukoflow_hours_since_last_completed_night", ()) not in got


def test_the_command_prints_or_writes_the_textfile_atomically(store, tmp_path, capsys):
    from leukoflow.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as done:
            main(["metrics", "--store", store.path, *args])
        return done.value.code, capsys.readouterr()

    code, printed = run()
    assert code == 0
    assert samples(printed.out)[("leukoflow_sweeps", (("outcome", "completed"),))] == 3

    target = tmp_path / "textfile" / "leukoflow.prom"
    target.parent.mkdir()
    code, printed = run("--textfile", target, "--json")
    assert code == 0
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["textfile"] == str(target) and summary["nights"] == 4
    assert summary["sweeps"] == {"completed": 3, "failed": 1, "busy": 1}
    assert samples(target.read_text())[("leukoflow_sweeps", (("outcome", "failed"),))] == 1
    assert [p.name for p in target.parent.iterdir()] == ["leukoflow.prom"]  # no temporary left

    code, printed = run("--textfile", tmp_path / "missing" / "x.prom")
    assert code == 2 and printed.err.count("leukoflow: error") == 1 and "--textfile" in printed.err
