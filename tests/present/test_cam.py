"""Class activation maps: the maths against scikit-learn's own decision function and real Keras
feature maps (vgg16, random init, 64 px: a 2x2 map)."""

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb
from leukoflow.features.extract import Featuriser
from leukoflow.learn import train
from leukoflow.present import cam
from leukoflow.present.explain import Explainer
from leukoflow.store.records import ModelRecord

RECIPE = {"backbones": ["a", "b"], "dims": [3, 2]}


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=5.0, scale=[1, 2, 3, 4, 5], size=(40, 5))
    y = (x[:, 0] + 0.5 * x[:, 3] + rng.normal(size=40) > 7.0).astype(int)
    return train.fit("linear-svm", x, y), x, y


def test_the_affine_model_is_the_pipelines_decision_function(fitted):
    model, x, _ = fitted
    linear = cam.linear_model(model, RECIPE)
    expected = model.decision_function(x)
    assert np.allclose([linear.decision(row) for row in x], expected, atol=1e-9)
    # The effective weight on a raw feature is coef / scale.
    assert np.allclose(linear.weights, model[-1].coef_[0] / model[0].scale_)


def test_block_contributions_add_up_and_split_over_features(fitted):
    model, x, _ = fitted
    linear = cam.linear_model(model, RECIPE)
    parts = cam.block_contributions(linear, x[0])
    assert list(parts) == ["a", "b"]
    assert sum(parts.values()) == pytest.approx(model.decision_function(x[:1])[0], abs=1e-9)
    for name in ("a", "b"):
        share = cam.feature_contributions(linear, name, x[0]).sum() + linear.intercept / 2
        assert share == pytest.approx(parts[name], abs=1e-9)
    top = cam.top_features(["f0", "f1"], x[0][3:], cam.feature_contributions(linear, "b", x[0]), 1)
    contributions = cam.feature_contributions(linear, "b", x[0])
    assert top[0]["name"] == f"f{int(np.argmax(np.abs(contributions)))}"


def test_a_calibrated_model_uses_the_mean_of_its_linear_copies(fitted):
    _, x, y = fitted
    svm = LinearSVC(C=1.0, loss="hinge", dual=True, max_iter=20_000, random_state=0)
    calibrated = CalibratedClassifierCV(svm, method="sigmoid", cv=3, ensemble=True)
    model = Pipeline([("scale", StandardScaler()), ("clf", calibrated)]).fit(x, y)
    linear = cam.linear_model(model, RECIPE)
    scaled = model[0].transform(x)
    copies = [c.estimator.decision_function(scaled) for c in model[-1].calibrated_classifiers_]
    assert len(copies) == 3
    assert np.allclose([linear.decision(row) for row in x], np.mean(copies, axis=0), atol=1e-9)


def test_non_linear_or_mismatched_models_are_refused(fitted):
    model, x, y = fitted
    with pytest.raises(LeukoflowError, match="linear"):
        cam.linear_model(train.fit("rbf-svm", x, y), RECIPE)
    with pytest.raises(LeukoflowError, match="5 weights"):
        cam.linear_model(model, {"backbones": ["a"], "dims": [4]})


def test_the_map_of_a_real_cnn_is_exact(synthetic_images):
    """CAM = weights applied to the last conv map; its spatial mean + offset = the decision."""
    from PIL import Image

    from leukoflow.features.images import resize_pixels

    files = sorted(synthetic_images.rglob("*.bmp"))[6:18]  # 6 ALL, 6 normal
    cells = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    pixels = np.stack([resize_pixels(c, 64) for c in cells])
    choice = bb.WeightsChoice("none", seed=3)
    gap = Featuriser(bb.BACKBONES["vgg16"], 64, choice)(pixels)  # the pipeline's own features
    y = np.array([int("_all" in f.name) for f in files])
    model = train.fit("linear-svm", gap, y)
    record = ModelRecord.from_dict(
        {
            "model_id": "m",
            "threshold": 0.0,
            "feature_recipe": {
                "backbones": ["vgg16"],
                "dims": [512],
                "weights_ids": {"vgg16": "random-seed3"},
                "image_size": 64,
            },
        }
    )
    explainer = Explainer(model, record)
    explanation = explainer.explain("cell", cells[0], stored=gap[0])
    heat = explanation.maps["vgg16"]
    assert heat.shape == (2, 2)

    feature_map = explainer.feature_maps(cells[0])["vgg16"]
    weights = model[-1].coef_[0] / model[0].scale_
    offset = model[-1].intercept_[0] - np.sum(model[-1].coef_[0] * model[0].mean_ / model[0].scale_)
    by_hand = np.array(
        [[sum(weights[c] * feature_map[i, j, c] for c in range(512)) for j in range(2)]
        for i in range(2)]
    ) + offset  # fmt: skip
    assert np.allclose(heat, by_hand, rtol=1e-9, atol=1e-9)
    # The map's spatial mean is the decision on the stored GAP vector (float32 round-off apart).
    decision = model.decision_function(gap[:1])[0]
    assert heat.mean() == pytest.approx(decision, rel=1e-4, abs=1e-4)
    assert explanation.decision == pytest.approx(decision, rel=1e-4, abs=1e-4)
    assert explanation.score == pytest.approx(decision, rel=1e-4, abs=1e-4)
    assert not np.allclose(heat, heat.mean())  # a real map, not a constant


def test_features_of_other_weights_are_refused(synthetic_images):
    """A map must explain the features the model saw: another seed gives other features."""
    from PIL import Image

    files = sorted(synthetic_images.rglob("*.bmp"))[:4]
    cells = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    rng = np.random.default_rng(1)
    gap = rng.uniform(0, 1, size=(4, 512)).astype(np.float32)
    model = train.fit("linear-svm", gap, np.array([0, 1, 0, 1]))
    record = ModelRecord.from_dict(
        {
            "model_id": "m",
            "feature_recipe": {
                "backbones": ["vgg16"],
                "dims": [512],
                "weights_ids": {"vgg16": "random-seed0"},
                "image_size": 32,
            },
        }
    )
    with pytest.raises(LeukoflowError, match="differ from the stored"):
        Explainer(model, record).explain("cell", cells[0], stored=gap[0])


def test_random_init_is_the_same_while_another_thread_draws_from_random():
    """Keras seeds each initializer from the global `random`; Prefect's threads draw from it
    too, which changed the rebuilt InceptionResNetV2 inside the run flow before the fix."""
    import random
    import threading
    import time

    spec = bb.BACKBONES["vgg16"]
    reference = bb.build_model(spec, 32, None, 0).get_weights()
    stop = threading.Event()

    def draw_forever():
        while not stop.is_set():
            random.random()
            time.sleep(0)

    noise = threading.Thread(target=draw_forever, daemon=True)
    noise.start()
    try:
        rebuilt = bb.build_model(spec, 32, None, 0).get_weights()
    finally:
        stop.set()
        noise.join()
    assert all(np.array_equal(a, b) for a, b in zip(reference, rebuilt, strict=True))
