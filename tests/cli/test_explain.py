"""`leukoflow explain` as a user meets it: a real subprocess on a real cell (PNG, --json); the
other cases through the same entry point in this process."""

import json

import pytest

from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog

from . import assert_user_error, leukoflow, leukoflow_here

pytestmark = pytest.mark.integration  # the store comes from the real run flow (Ray, Prefect)


def test_explain_writes_a_png_for_a_real_cell(real_cells_store, real_cells, tmp_path):
    store, summary = real_cells_store
    cell = sorted(real_cells.rglob("*.bmp"))[0]
    out = tmp_path / "cell.png"
    result = leukoflow("explain", cell, "--store", store, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["png"] == str(out) and facts["model_id"] == summary["model_id"]
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 20_000
    assert facts["non_clinical"] is True
    assert set(facts["contributions"]) == {"vgg16", "color_morphology"}
    assert sum(facts["contributions"].values()) == pytest.approx(facts["linear_decision"])
    assert facts["predicted_label"] in ("all", "hem") and len(facts["top_features"]) == 8


def test_explain_by_catalog_id_writes_next_to_the_user(
    real_cells_store, tmp_path, monkeypatch, capsys
):
    store, _ = real_cells_store
    first = read_catalog(open_location(str(store))).column("image_id").to_pylist()[0]
    monkeypatch.chdir(tmp_path)
    result = leukoflow_here(capsys, "explain", first, "--store", store)
    assert result.returncode == 0, result.stderr
    assert "NOT CLINICALLY MEANINGFUL" in result.stdout
    assert (tmp_path / f"{first[:12]}-explained.png").stat().st_size > 20_000


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "no-such-model"], "no model no-such-model"),
        (["--image", "nope.bmp"], "not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    real_cells_store, real_cells, tmp_path, capsys, args, words
):
    store, _ = real_cells_store
    image = str(sorted(real_cells.rglob("*.bmp"))[0])
    if args[0] == "--image":
        image, args = str(tmp_path / args[1]), []
    assert_user_error(leukoflow_here(capsys, "explain", image, "--store", store, *args), words)
