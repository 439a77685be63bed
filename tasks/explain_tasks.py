"""Thin Prefect @task wrapper over present/explain: the report's example gallery."""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.present import cam
from leukoflow.present.explain import (
    Explainer,
    FeatureMapSource,
    example_gallery,
    explain_images,
    explanation_name,
    explanations_folder,
    pick_examples,
)
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import Location, exists
from leukoflow.store.tables import read_predictions
from leukoflow.vocabulary import Label, flagged


@task(name="explain-examples", cache_policy=NO_CACHE)
def explain_examples(
    model,
    record: ModelRecord,
    test_ids: list[str],
    y_true: np.ndarray,
    scores: np.ndarray,
    uris: dict[str, str],
    vectors: dict[str, np.ndarray],
    weights_dir: str | None,
    per_kind: int = choices.REPORT_EXAMPLES_PER_KIND,
    maps: FeatureMapSource | None = None,
    subject_keys: dict[str, str | None] | None = None,
) -> list[dict]:
    """Activation maps of up to `per_kind` true positives, false positives and false negatives of
    the saved model (`scores` are its test scores, read against record.threshold), each
    captioned with its subject's pseudonym (`subject_keys`), file name, score and threshold.

    `maps`: the run's backbone actors (engine/actors.BackbonePool), so that no network is built
    again; without, each CNN is built once in this process.
    """
    logger = get_run_logger()
    y_pred = flagged(np.asarray(scores, dtype=np.float64), float(record.threshold)).astype(int)
    cases = pick_examples(test_ids, y_true, y_pred, scores, per_kind)
    if not cases:
        return []
    try:
        cam.linear_model(model, record.feature_recipe)
    except LeukoflowError as why:  # a non-linear classifier has no exact activation map
        logger.info("examples: none in the report (%s)", why)
        return []
    explainer = Explainer(model, record, weights_dir, maps=maps)
    gallery = example_gallery(explainer, cases, uris, vectors)
    score_of = dict(zip(test_ids, np.asarray(scores, dtype=float).tolist(), strict=True))
    for example in gallery:
        image_id = example["image_id"]
        example.update(
            subject_key=(subject_keys or {}).get(image_id),
            file_name=PurePosixPath(uris[image_id]).name,
            score=score_of[image_id],
            threshold=float(record.threshold),
        )
    logger.info("examples: %s", ", ".join(f"{e['kind']} {e['image_id'][:12]}" for e in gallery))
    return gallery


@task(name="explain-flagged", cache_policy=NO_CACHE)
def explain_flagged_cells(
    store: Location,
    model_id: str,
    night: str,
    limit: int,
    weights_dir: str | None,
    maps: FeatureMapSource | None = None,
) -> dict:
    """PNGs for the night's flagged cells that have none yet, most ALL-like first, `limit` at
    most per sweep (a resumed or repeated sweep continues where the last one stopped).
    `maps`: the sweep's backbone actors, as for explain_examples."""
    logger = get_run_logger()
    columns = ["image_id", "score", "predicted_label"]
    rows = read_predictions(store, night, model_id, columns=columns).to_pylist()
    flagged = sorted((r for r in rows if r["predicted_label"] == Label.ALL),
                     key=lambda r: -r["score"])  # fmt: skip
    folder = explanations_folder(store, night)
    missing = [
        r["image_id"] for r in flagged if not exists(folder.child(explanation_name(r["image_id"])))
    ]
    written = explain_images(store, model_id, missing[:limit], folder.uri, weights_dir, maps=maps)
    logger.info("explain: %d flagged cells, %d PNGs written to %s", len(flagged), len(written),
                folder.uri)  # fmt: skip
    return {
        "folder": folder.uri,
        "flagged": len(flagged),
        "written": len(written),
        "left_for_next_sweep": max(0, len(missing) - limit),
    }
