"""`leukoflow run`: catalog -> extract -> join -> train -> evaluate -> report, as one flow."""

from __future__ import annotations

import json
import platform
import uuid
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from prefect import flow

from leukoflow.errors import LeukoflowError
from leukoflow.tasks import backbones as bb
from leukoflow.tasks import calibration, evaluate, registry, train
from leukoflow.tasks.actors import check_actor_resources
from leukoflow.tasks.explain_tasks import explain_examples
from leukoflow.tasks.prefect_tasks import (
    catalog_images,
    extract,
    join,
    save_and_report,
    train_and_evaluate,
)
from leukoflow.tasks.score import score_reference
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import STATUS_DUPLICATE, STATUS_OK, STATUS_QUARANTINED, write_run

PACKAGES = ("leukoflow", "keras", "scikit-learn", "numpy", "pyarrow", "ray", "prefect", "skops")

NON_CLINICAL_NOTE = (
    "NOT CLINICALLY MEANINGFUL: features from random-initialised networks (--weights none)"
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), **{p: version(p) for p in PACKAGES}}
    for distribution in ("tensorflow", "tensorflow-cpu"):  # GPU images install the former
        try:
            versions["tensorflow"] = version(distribution)
            break
        except PackageNotFoundError:
            continue
    return versions


@flow(name="leukoflow-run", log_prints=False)
def run_pipeline(
    images: str,
    store: str,
    dataset: str = "default",
    backbones: list[str] | None = None,
    weights: str = "imagenet",
    weights_dir: str | None = None,
    image_size: int = 224,
    classifier: str = train.DEFAULT_CLASSIFIER,
    split: str = "random",
    seed: int = 0,
    labels: dict[str, str] | None = None,
    ray_address: str | None = None,
    batch_size: int = 32,
    target_sensitivity: float = calibration.DEFAULT_TARGET_SENSITIVITY,
    gpu_share: float | None = None,
    actor_cpus: float | None = None,
    examples_per_kind: int = 3,
) -> dict:
    """The whole pipeline on one collection of images; returns the run's summary.

    The report shows up to `examples_per_kind` true/false positives and false negatives of the
    test split with their activation maps (0: none).
    """
    started = datetime.now(UTC)
    run_id = f"{started.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    # Validate everything a user can get wrong before any work starts.
    backbones = bb.parse_backbones(backbones or list(bb.DEFAULT_BACKBONES))
    bb.check_image_size(backbones, image_size)
    train.make_classifier(classifier)
    train.check_split(split)
    calibration.check_target_sensitivity(target_sensitivity)
    check_actor_resources(gpu_share, actor_cpus)
    choice = bb.parse_weights(weights, weights_dir, seed)
    weight_ids = {name: bb.weights_id(bb.BACKBONES[name], choice) for name in backbones}
    root = open_location(store)

    rows = catalog_images(images, root, dataset, labels)
    # One class, or too few subjects for the split: say so before hours of extraction.
    trainable = _labelled(rows)
    planned_y = evaluate.labels_to_int([r["label"] for r in trainable])
    planned_subjects = [r["subject_id"] for r in trainable]
    planned = train.split_rows(planned_y, planned_subjects, split, seed=seed)
    # The calibration folds inside the training side need two or more cells of each class too.
    train.kfold(
        planned_y[planned.train],
        [planned_subjects[i] for i in planned.train],
        calibration.DEFAULT_CALIBRATION_FOLDS,
        seed,
    )
    features = extract(
        root, rows, backbones, choice, weight_ids, image_size, batch_size, ray_address,
        gpu_share, actor_cpus,
    )  # fmt: skip

    labelled = [r for r in trainable if r["image_id"] not in features["rejected"]]
    joined = join(root, [r["image_id"] for r in labelled], backbones, weight_ids, image_size)
    by_id = {r["image_id"]: r for r in labelled}
    y = evaluate.labels_to_int([by_id[i]["label"] for i in joined.image_ids])
    subjects = [by_id[i]["subject_id"] for i in joined.image_ids]
    fitted = train_and_evaluate(
        joined.matrix, y, subjects, classifier, split, seed, target_sensitivity
    )

    train_ids = [joined.image_ids[i] for i in fitted["split"].train]
    model_id = registry.new_model_id(classifier, train.fingerprint(train_ids))
    recipe = {
        "backbones": backbones,
        "dims": joined.dims,
        "feature_dim": int(joined.matrix.shape[1]),
        "weights": choice.kind,
        "weights_ids": weight_ids,
        "image_size": image_size,
    }
    record = {
        "model_id": model_id,
        "created_at": started.isoformat(),
        "dataset": dataset,
        "feature_recipe": recipe,
        "non_clinical": bb.uses_random_weights(backbones, choice),
        "classifier": classifier,
        # The paper's classifier settings; the saved model wraps them in calibration.
        "classifier_params": _params(fitted["headline_model"]),
        "score_kind": fitted["score_kind"],
        "threshold": fitted["threshold"],
        "target_sensitivity": target_sensitivity,
        "calibration": fitted["calibration"],
        "split": split,
        "seed": seed,
        "n_train": len(train_ids),
        "n_test": len(fitted["split"].test),
        "training_fingerprint": train.fingerprint(train_ids),
        "test_image_ids": [joined.image_ids[i] for i in fitted["split"].test],
        "reference": {
            "feature_mean": joined.matrix[fitted["split"].train].mean(axis=0).tolist(),
            "feature_std": joined.matrix[fitted["split"].train].std(axis=0).tolist(),
            # The saved model's scores on held-out cells: nightly drift compares against these
            # (training-set scores of a separating SVM are more extreme than new cells' ever are).
            "scores": score_reference(
                *train.decision_scores(fitted["model"], joined.matrix[fitted["split"].test]),
                split="held-out test",
            ),
        },
        "metrics": fitted["metrics"],
        "package_versions": package_versions(),
        "code_version": registry.code_version(),
    }
    counts = _accounting(rows, features["rejected"], joined)
    summary = {
        "run_id": run_id,
        "model_id": model_id,
        "dataset": dataset,
        "store": root.uri,
        "backbones": backbones,
        "feature_dim": recipe["feature_dim"],
        "weights_id": ",".join(weight_ids[n] for n in backbones),
        "non_clinical": record["non_clinical"],
        "note": NON_CLINICAL_NOTE if record["non_clinical"] else None,
        "image_size": image_size,
        "classifier": classifier,
        "classifier_params": record["classifier_params"],
        "split": split,
        "seed": seed,
        "n_train": record["n_train"],
        "n_test": record["n_test"],
        "counts": counts,
        "quarantined": [
            {"image_id": r["image_id"], "reason": r["reason"]}
            for r in rows
            if r["status"] == STATUS_QUARANTINED
        ],
        "extraction": features,
        "metrics": fitted["metrics"],
        "score_kind": record["score_kind"],
        "threshold": record["threshold"],
        "calibration": record["calibration"],
        "created_at": started.isoformat(),
        "code_version": record["code_version"],
        "package_versions": record["package_versions"],
    }
    test_ids = [joined.image_ids[i] for i in fitted["split"].test]
    examples = []
    if examples_per_kind > 0:
        examples = explain_examples(
            fitted["model"], record, test_ids, fitted["y_test"], fitted["test_probabilities"],
            {i: by_id[i]["uri"] for i in test_ids},
            {i: joined.matrix[k] for k, i in zip(fitted["split"].test, test_ids, strict=True)},
            choice.folder, examples_per_kind,
        )  # fmt: skip
    summary["paths"] = save_and_report(root, model_id, fitted, record, summary, examples)
    finished = datetime.now(UTC)
    write_run(
        root,
        {
            "run_id": run_id,
            "kind": "run",
            "dataset": dataset,
            "started_at": started,
            "finished_at": finished,
            "outcome": "completed",
            "images_found": counts["found"],
            "images_new": max(features["computed"].values(), default=0),
            "images_featurised": counts["featurised"],
            "images_quarantined": counts["quarantined"],
            "images_duplicate": counts["duplicate"],
            "images_scored": len(fitted["split"].test),
            "images_skipped": 0,
            "images_per_second": features["images_per_second"],
            "model_id": model_id,
            "weights_id": summary["weights_id"],
            "details": json.dumps({"metrics": fitted["metrics"], "paths": summary["paths"]}),
        },
    )
    summary.pop("quarantined")
    return summary


def _labelled(rows: list[dict]) -> list[dict]:
    """The catalogued images a classifier can learn from: decodable and labelled."""
    labels = (evaluate.POSITIVE_LABEL, evaluate.NEGATIVE_LABEL)
    labelled = [r for r in rows if r["status"] == STATUS_OK and r["label"] in labels]
    if not labelled:
        raise LeukoflowError("no labelled images to train on (labels come from folders or CSV)")
    return labelled


def _params(model) -> dict:
    params = model[-1].get_params()
    return {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _accounting(rows: list[dict], rejected: dict[str, str], joined) -> dict[str, int]:
    """found = featurised + quarantined + duplicate (+ ok images still lacking a vector)."""
    found = len(rows)
    quarantined = sum(r["status"] == STATUS_QUARANTINED for r in rows) + len(rejected)
    duplicate = sum(r["status"] == STATUS_DUPLICATE for r in rows)
    ok = sum(r["status"] == STATUS_OK for r in rows) - len(rejected)
    return {
        "found": found,
        "featurised": ok,
        "quarantined": quarantined,
        "duplicate": duplicate,
        "trained_and_tested": len(joined.image_ids),
        "missing_features": len(joined.missing),
        "unlabelled": ok - len(joined.image_ids) - len(joined.missing),
    }
