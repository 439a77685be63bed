"""Benchmark sections that run inside a child process of their own (see bench.child).

Each takes the run's settings as a dict and returns a JSON-able dict of measurements. Timings
here are taken with time.perf_counter() around exactly the work named; the harness adds the
child's wall time and peak memory from outside.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.decode import decode_stage


# -- 1. the compute limit --------------------------------------------------------------------
def compute_limit(settings: dict) -> dict:
    """Each backbone's forward pass on preloaded, preprocessed tensors at its best batch size."""
    from leukoflow.features import backbones as bb

    choice = bb.parse_weights(settings["weights"], None, 0)
    size = settings["image_size"]
    rng = np.random.default_rng(0)
    per_backbone = {}
    for name in settings["backbones"]:
        spec = bb.BACKBONES[name]
        weights_path = None
        if choice.kind == "imagenet":
            weights_path = str(bb.resolve_weights_file(spec, choice)[0])
        t0 = time.perf_counter()
        model = bb.build_model(
            spec, size, weights_path, 0, precision=settings.get("precision", "fp32")
        )
        load_seconds = time.perf_counter() - t0
        largest = max(settings["batch_sizes"])
        pixels = rng.uniform(0, 255, size=(largest, size, size, 3)).astype(np.float32)
        tensor = bb.preprocess(spec, pixels)
        sweep = {
            bs: _seconds_per_image(model, tensor[:bs], settings["min_seconds"])
            for bs in settings["batch_sizes"]
        }
        best = min(sweep, key=sweep.get)
        per_backbone[name] = {
            "load_seconds": load_seconds,
            "best_batch_size": best,
            "images_per_second": 1.0 / sweep[best],
            "sweep_images_per_second": {str(bs): 1.0 / s for bs, s in sweep.items()},
        }
        del model
        _clear_keras()
    seconds_per_image = sum(1.0 / r["images_per_second"] for r in per_backbone.values())
    return {
        "precision": settings.get("precision", "fp32"),
        "backbones": per_backbone,
        "images_per_second": 1.0 / seconds_per_image,
    }


def _seconds_per_image(model, batch: np.ndarray, min_seconds: float) -> float:
    """Steady-state seconds per image: one warm-up call (graph tracing), then timed repeats."""
    model.predict_on_batch(batch)
    repeats, started = 0, time.perf_counter()
    while True:
        model.predict_on_batch(batch)
        repeats += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds or repeats >= 200:
            return elapsed / (repeats * len(batch))


def _clear_keras() -> None:
    import keras

    keras.backend.clear_session()


# -- color_morphology ------------------------------------------------------------------------
def color_morphology(settings: dict) -> dict:
    """The hand-crafted extractor on one core, full-resolution cells, decoding excluded."""
    from leukoflow.features.color_morphology import extract_features
    from leukoflow.features.images import decode_image

    core = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {core})
    paths = sorted(Path(settings["images"]).rglob("*.bmp"))[: settings["cm_images"]]
    cells = [decode_image(path.read_bytes()).pixels for path in paths]
    extract_features(cells[0])  # first call pays imports and caches
    started, cpu_started = time.perf_counter(), time.process_time()
    for pixels in cells:
        extract_features(pixels)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    return {
        "n_images": len(cells),
        "image_shape": list(cells[0].shape),
        "core": core,
        # Per core = per second of CPU: on a machine shared with other work the wall-clock rate
        # also counts the time the core spent on someone else; the two agree on an idle core.
        "images_per_second_per_core": len(cells) / cpu_seconds,
        "images_per_second_wall": len(cells) / seconds,
    }


# -- join and train at scale -----------------------------------------------------------------
JOIN_DIMS = {"vgg16": 512, "densenet121": 1024, "inception_resnet_v2": 1536}


def synthetic_vectors(n: int, dims: dict[str, int], seed: int = 0) -> tuple[dict, np.ndarray]:
    """GAP-like vectors (non-negative, correlated) with a class signal a linear model can use.

    A 32-dimensional latent factor per image, mapped through a fixed random matrix and a ReLU
    like a network's last block; the class shifts the latent factor by 2.6 standard
    deviations along one direction, which leaves the classes overlapping (real CNN features give
    a linear SVM about 90% accuracy on C-NMC).
    """
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    latent = rng.normal(0.0, 1.0, size=(n, 32)).astype(np.float32)
    latent[:, 0] += 2.6 * (labels - 0.5)
    vectors = {}
    for name, dim in dims.items():
        mixing = rng.normal(0.0, 1.0 / np.sqrt(32), size=(32, dim)).astype(np.float32)
        noise = rng.normal(0.0, 0.5, size=(n, dim)).astype(np.float32)
        vectors[name] = np.maximum(latent @ mixing + noise, 0.0)
    return vectors, labels


def join_train(settings: dict) -> dict:
    """Write generated vectors as extraction would (one file per batch), then join and train."""
    from leukoflow import choices
    from leukoflow.features.join import join_features
    from leukoflow.learn import evaluate, train
    from leukoflow.recipe import FeatureRecipe
    from leukoflow.store.storage import open_location
    from leukoflow.store.tables import compact_features, write_features

    n, batch = settings["join_n"], settings["batch_size"]
    vectors, labels = synthetic_vectors(n, JOIN_DIMS)
    image_ids = [f"{i:064x}" for i in range(n)]
    recipe = FeatureRecipe(tuple(JOIN_DIMS), weights="none", image_size=224)
    with tempfile.TemporaryDirectory(dir=settings["workdir"]) as folder:
        store = open_location(folder)
        for name, matrix in vectors.items():
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                ids = image_ids[start:stop]
                write_features(store, name, *recipe.vector_key(name), ids, matrix[start:stop])
        t0 = time.perf_counter()
        join_features(store, image_ids, recipe)
        t1 = time.perf_counter()
        for name in JOIN_DIMS:
            compact_features(store, name)
        t2 = time.perf_counter()
        joined = join_features(store, image_ids, recipe)
        t3 = time.perf_counter()
    y = labels[np.array([int(i, 16) for i in joined.image_ids])]
    parts = train.split_rows(y, [None] * len(y), "random", seed=0)
    model = train.fit(choices.DEFAULT_CLASSIFIER, joined.matrix[parts.train], y[parts.train], 0)
    x_test = joined.matrix[parts.test]
    scores, _ = train.decision_scores(model, x_test)
    metrics = evaluate.compute_metrics(y[parts.test], model.predict(x_test), scores)
    t4 = time.perf_counter()
    calibration_seconds = None
    if settings["join_calibration"]:
        from leukoflow.learn import calibration

        calibration.calibrate_and_choose_threshold(
            choices.DEFAULT_CLASSIFIER, joined.matrix[parts.train], y[parts.train],
            [None] * len(parts.train), x_test, y[parts.test],
        )  # fmt: skip
        calibration_seconds = time.perf_counter() - t4
    return {
        "n_images": n,
        "n_features": int(joined.matrix.shape[1]),
        "files_per_backbone_before_compaction": -(-n // batch),
        "join_seconds_per_batch_files": t1 - t0,
        "compact_seconds": t2 - t1,
        "join_seconds": t3 - t2,
        "train_evaluate_seconds": t4 - t3,
        "join_train_seconds": t4 - t2,
        "calibration_seconds": calibration_seconds,  # what `run` adds: k more fits
        "classifier": choices.DEFAULT_CLASSIFIER,
        "test_accuracy": metrics["accuracy"],
    }


SECTIONS = {
    "compute_limit": compute_limit,
    "decode_stage": decode_stage,
    "color_morphology": color_morphology,
    "join_train": join_train,
}
