"""Explanations of real C-NMC cells under a model trained by the real `run` flow (vgg16 at 32 px,
random init, + color_morphology), and the report's example gallery."""

import io
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from leukoflow.errors import LeukoflowError
from leukoflow.features.color_morphology import FEATURE_NAMES
from leukoflow.learn import train
from leukoflow.present.explain import (
    Explainer,
    explain_images,
    pick_examples,
    read_cell,
    render_explanation,
    stored_vector,
)
from leukoflow.present.report import render_report
from leukoflow.store import registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog

pytestmark = pytest.mark.integration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _catalog(store):
    return {r["image_id"]: r for r in read_catalog(open_location(str(store))).to_pylist()}


def test_explain_images_writes_a_png_per_real_cell(real_cells_store, tmp_path):
    store, summary = real_cells_store
    ids = sorted(_catalog(store))[:2]
    paths = explain_images(str(store), summary["model_id"], ids, str(tmp_path / "png"))
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"{i}.png" for i in ids]
    for path in paths:
        data = open(path, "rb").read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
        width, height = Image.open(io.BytesIO(data)).size
        assert width > 600 and height > 500  # cell, map, segmentation and the feature bars


def test_a_real_cells_explanation_adds_up_to_the_saved_models_score(real_cells_store):
    store, summary = real_cells_store
    root = open_location(str(store))
    model, record = registry.load_model(root, summary["model_id"])
    image_id, row = next(iter(sorted(_catalog(store).items())))
    _, pixels = read_cell(row["uri"], image_id)
    stored = stored_vector(root, record.feature_recipe, image_id)
    assert stored is not None
    # explain() checks the recomputed features against the stored ones (raises if they differ).
    explanation = Explainer(model, record).explain(image_id, pixels, stored)

    assert list(explanation.contributions) == ["vgg16", "color_morphology"]
    assert sum(explanation.contributions.values()) == pytest.approx(explanation.decision)
    assert explanation.maps["vgg16"].shape == (1, 1)  # 32 px through VGG16's five poolings
    assert explanation.maps["vgg16"].mean() == pytest.approx(explanation.contributions["vgg16"])
    score, kind = train.decision_scores(model, stored[None])
    assert kind == record.score_kind
    # The explanation scores its recomputed vectors: float round-off of the recomputation (another
    # process, another thread count) moves the probability by about 1e-4 of itself at most.
    assert explanation.score == pytest.approx(score[0], rel=1e-3, abs=1e-4)
    assert explanation.non_clinical is True
    assert explanation.segmentation.cell_mask.sum() > 1000  # a real cell, found
    top = explanation.top_features
    assert len(top) == 8 and {f["name"] for f in top} <= set(FEATURE_NAMES)
    sizes = [abs(f["contribution"]) for f in top]
    assert sizes == sorted(sizes, reverse=True)
    assert len(render_explanation(explanation).axes) == 5  # cell, map + colorbar, seg, bars


def test_the_run_report_shows_the_saved_models_test_errors(real_cells_store):
    store, summary = real_cells_store
    root = open_location(str(store))
    model, record = registry.load_model(root, summary["model_id"])
    test_ids = record.test_image_ids
    catalog = _catalog(store)
    x = np.stack([stored_vector(root, record.feature_recipe, i) for i in test_ids])
    scores, _ = train.decision_scores(model, x)
    y = np.array([int(catalog[i]["label"] == "all") for i in test_ids])
    flagged = (scores >= record.threshold).astype(int)
    # The held-out side holds ALL cells, so each is a TP or an FN: the gallery cannot be empty.
    assert y.sum() >= 1, "the test split of real_cells_store has no ALL cell"
    cases = pick_examples(test_ids, y, flagged, scores)
    assert cases
    truth = dict(zip(test_ids, zip(y.tolist(), flagged.tolist(), strict=True), strict=True))
    kind_of = {(1, 1): "TP", (0, 1): "FP", (1, 0): "FN"}
    for kind, image_id in cases:
        assert kind_of[truth[image_id]] == kind, (kind, image_id)  # never a true negative
    html = open(summary["paths"]["report_html"]).read()
    assert "Examples with their activation maps" in html
    shown = re.findall(
        r'<figure><img src="data:image/png;base64,[^"]+" alt="(TP|FP|FN) ([0-9a-f]{16})', html
    )
    assert shown == [(kind, image_id[:16]) for kind, image_id in cases]


def test_unknown_image_ids_are_a_user_error(real_cells_store, tmp_path):
    store, summary = real_cells_store
    with pytest.raises(LeukoflowError, match="not in the catalog"):
        explain_images(str(store), summary["model_id"], ["0" * 64], str(tmp_path))


def test_pick_examples_takes_the_most_confident_of_each_kind():
    ids = ["a", "b", "c", "d", "e", "f"]
    y_true = np.array([1, 1, 0, 0, 1, 1])
    scores = np.array([0.9, 0.6, 0.8, 0.1, 0.2, 0.4])
    y_pred = (scores >= 0.5).astype(int)
    assert pick_examples(ids, y_true, y_pred, scores, per_kind=1) == [
        ("TP", "a"),
        ("FP", "c"),
        ("FN", "e"),
    ]


def test_the_report_gallery_is_self_contained():
    examples = [
        {"kind": "TP", "image_id": "a" * 64, "png_data_uri": "data:image/png;base64,AAAA"},
        {"kind": "FN", "image_id": "b" * 64, "png_data_uri": "https://example.org/x.png"},
    ]
    y = np.array([0, 1])
    markdown, html = render_report({"metrics": None}, y, y, np.array([-1.0, 1.0]), None, examples)
    assert 'src="data:image/png;base64,AAAA" alt="TP aaaaaaaaaaaaaaaa"' in html
    assert "example.org" not in html  # a remote image would break the offline report
    assert "None in the test split." in html  # no FP
    assert "| TP | " + "a" * 64 + " |" in markdown


def test_the_nightly_sweep_explains_its_flagged_cells(real_cells_store, real_cells, tmp_path):
    import shutil

    from leukoflow.flows.score import score_inbox

    store = tmp_path / "store"  # a copy: the sweep writes predictions, a catalog, a threshold
    shutil.copytree(real_cells_store[0], store)
    root = open_location(str(store))
    model_id = real_cells_store[1]["model_id"]
    model, record = registry.load_model(root, model_id)
    x = np.stack([stored_vector(root, record.feature_recipe, i) for i in _catalog(store)])
    # Twelve cells are too few for the calibrated threshold to flag any; save the same model
    # with its operating point at the median score (an edited model.json would be refused as
    # altered), so that the night has flagged cells to explain.
    threshold = float(np.median(train.decision_scores(model, x)[0]))
    registry.save_model(root, "m-median", model, replace(record, model_id="m-median",
                                                  threshold=threshold))  # fmt: skip
    registry.promote(root, "m-median")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for cell in sorted(real_cells.rglob("*.bmp")):
        shutil.copyfile(cell, inbox / cell.name)

    def sweep() -> dict:
        night = score_inbox(
            str(inbox), str(store), date="2026-01-02", explain_flagged=True, explain_limit=4
        )
        return night["explanations"]

    first, second, third = sweep(), sweep(), sweep()
    assert first["flagged"] == 6 and first["written"] == 4 and first["left_for_next_sweep"] == 2
    assert second["written"] == 2 and third["written"] == 0  # a later sweep finishes the night
    pngs = sorted((store / "explanations" / "date=2026-01-02").glob("*.png"))
    assert len(pngs) == 6 and all(p.read_bytes().startswith(PNG_SIGNATURE) for p in pngs)


def test_explanations_reuse_the_running_backbone_actors(real_cells_store, tmp_path):
    """The pool that extracted the vectors gives the maps: same actor process, no network built
    in this (the driver's) process, and the same explanation as a network built here."""
    from leukoflow.engine.actors import BackbonePool, extract_features
    from leukoflow.present import explain as explain_module
    from leukoflow.recipe import Compute, FeatureRecipe

    store, summary = real_cells_store
    root = open_location(str(store))
    model, record = registry.load_model(root, summary["model_id"])
    catalog = _catalog(store)
    ids = sorted(catalog)[:3]
    recipe = FeatureRecipe(("vgg16", "color_morphology"), weights="none", image_size=32)
    pool = BackbonePool(recipe, Compute(batch_size=2))
    try:
        fresh = open_location(str(tmp_path / "fresh-store"))
        extract_features(fresh, {i: catalog[i]["uri"] for i in ids}, {"vgg16": ids}, recipe,
                         Compute(batch_size=2), pool=pool)  # fmt: skip
        actor_pid = pool.loaded["vgg16"]["pid"]
        builds_before = explain_module._cached_featuriser.cache_info().misses
        _, pixels = read_cell(catalog[ids[0]]["uri"], ids[0])
        stored = stored_vector(root, record.feature_recipe, ids[0])
        by_actor = Explainer(model, record, maps=pool).explain(ids[0], pixels, stored)
        pngs = explain_images(root, summary["model_id"], ids[1:], str(tmp_path / "png"), maps=pool)
        assert pool.loaded["vgg16"]["pid"] == actor_pid  # the extraction's actor, not a new one
        assert explain_module._cached_featuriser.cache_info().misses == builds_before
    finally:
        pool.close()
    assert len(pngs) == 2
    local = Explainer(model, record).explain(ids[0], pixels, stored)
    np.testing.assert_allclose(by_actor.maps["vgg16"], local.maps["vgg16"], rtol=1e-6)
    assert by_actor.score == pytest.approx(local.score)


def test_actors_of_another_recipe_are_refused():
    """Actors computing other features (here: bf16) must not explain an fp32 model."""
    from leukoflow.engine.actors import BackbonePool
    from leukoflow.recipe import Compute, FeatureRecipe

    gap = np.random.default_rng(0).uniform(0, 1, size=(4, 512)).astype(np.float32)
    model = train.fit("linear-svm", gap, np.array([0, 1, 0, 1]))
    record = ModelRecord("m", feature_recipe={
        "backbones": ["vgg16"], "dims": [512], "weights_ids": {"vgg16": "random-seed0"},
        "image_size": 32, "precision": "fp32",
    })  # fmt: skip
    other = FeatureRecipe(("vgg16",), weights="none", image_size=32, precision="bf16")
    with pytest.raises(LeukoflowError, match="running vgg16 actor computes other features"):
        Explainer(model, record, maps=BackbonePool(other, Compute()))
    same = FeatureRecipe(("vgg16",), weights="none", image_size=32)
    Explainer(model, record, maps=BackbonePool(same, Compute()))  # no actor starts until used
