"""bench/cm_validate.py, the record behind docs/color_morphology.md's rounds, on a handful of
real cells: its cache (the raw vectors are the shipped ones; the per-subject normalisation pools
each subject's own cells) and the held-out check of a declared recipe on other subjects."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from datapaths import CNMC  # noqa: E402

from bench import cm_validate
from leukoflow.features.color_morphology import colour_moments, extract_features, feature_blocks


def _two_subjects() -> list[dict[str, str]]:
    """The cells of the first two subjects (one ALL, one normal) that have two or more."""
    rows = cm_validate.read_manifests([CNMC / "MANIFEST.csv"])
    chosen = []
    for label in ("all", "hem"):
        of_label = [r for r in rows if r["label"] == label]
        subject = next(
            r["subject"] for r in of_label if sum(o["subject"] == r["subject"] for o in rows) > 1
        )
        chosen += [r for r in of_label if r["subject"] == subject]
    return chosen


def test_the_cache_holds_the_shipped_vectors_and_per_subject_normalised_ones(tmp_path):
    rows = _two_subjects()
    assert len({r["subject"] for r in rows}) == 2 and len(rows) >= 4
    blocks = cm_validate.extract_all(rows, tmp_path, ("raw", "subject"))
    pixels = [cm_validate._pixels(r) for r in rows]
    raw = blocks["raw"]["base"].astype(np.float32)
    assert np.array_equal(raw, np.array([extract_features(p) for p in pixels]))

    for subject in {r["subject"] for r in rows}:
        mine = [i for i, r in enumerate(rows) if r["subject"] == subject]
        pooled = colour_moments(pixels[mine[0]])
        for i in mine[1:]:
            pooled = pooled + colour_moments(pixels[i])
        for i in mine:
            expected = feature_blocks(pixels[i], False, reference=pooled.reference())
            assert np.array_equal(blocks["subject"]["base"][i], expected["base"])
    # Not the same as normalising each cell on its own, nor as no normalisation.
    own = np.array([feature_blocks(p, True)["base"] for p in pixels])
    assert not np.allclose(blocks["subject"]["base"], own)
    assert not np.allclose(blocks["subject"]["base"], blocks["raw"]["base"])

    again = cm_validate.extract_all(rows, tmp_path, ("subject", "raw"))  # from the cache
    for mode in ("raw", "subject"):
        for name, values in blocks[mode].items():
            assert np.array_equal(again[mode][name], values)


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "subject_id", "sha256"])
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {"path": r["file"], "label": r["label"], "subject_id": r["subject"],
                 "sha256": r["sha256"]}
            )  # fmt: skip
    return path


def test_the_held_out_check_fits_on_the_pool_and_measures_other_subjects_once(tmp_path, capsys):
    rows = cm_validate.read_manifests([CNMC / "MANIFEST.csv"])
    subjects = sorted({r["subject"] for r in rows})
    kept = set(subjects[::4])  # a quarter of the subjects, both classes among them
    pool = _manifest(tmp_path / "pool.csv", [r for r in rows if r["subject"] not in kept])
    aside = _manifest(tmp_path / "aside.csv", [r for r in rows if r["subject"] in kept])
    out = tmp_path / "held.json"
    common = ["--cache", str(tmp_path / "cache"), "--variants", "cm-1", "--classifiers",
              "rbf-svm"]  # fmt: skip
    assert cm_validate.main([str(pool), *common, "--held-out", str(aside), "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    aside_rows = [r for r in rows if r["subject"] in kept]
    assert result["cell"]["n"] == len(aside_rows) and result["cell"]["subjects"] == len(kept)
    bacc = result["cell"]["balanced_accuracy"]
    assert 0 <= bacc["low"] <= bacc["value"] <= bacc["high"] <= 1
    patient = result["patient"]
    assert patient["patients"] == len(kept)
    assert {d["subject"] for d in patient["decisions"]} == kept
    assert all(d["cells"] >= 1 and 0 <= d["threshold"] <= 1 for d in patient["decisions"])
    assert "(held-out)" in capsys.readouterr().out

    # Cells of a pool subject are not "other subjects": refused, nothing measured.
    with pytest.raises(SystemExit) as refused:
        cm_validate.main([str(pool), *common, "--held-out", str(pool)])
    assert refused.value.code == 2
