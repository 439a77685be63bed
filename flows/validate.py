"""`leukoflow validate`: catalog -> extract -> join -> subject-grouped cross-validation.

The fixed protocol of docs/results.md, as one command: the paper's linear SVM on one feature set,
k folds grouped by subject, intervals that resample whole subjects. Vectors already in the store
are reused, so several feature sets of the same images cost one extraction per backbone.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow

from leukoflow.flows.run import NON_CLINICAL_NOTE, package_versions
from leukoflow.tasks import backbones as bb
from leukoflow.tasks import evaluate, validate
from leukoflow.tasks.prefect_tasks import catalog_images, extract, join
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import STATUS_OK
from leukoflow.tasks.validate_tasks import cross_validate


@flow(name="leukoflow-validate", log_prints=False)
def run_validation(
    images: str,
    store: str,
    dataset: str = "default",
    backbones: list[str] | None = None,
    weights: str = "imagenet",
    weights_dir: str | None = None,
    image_size: int = 224,
    folds: int = validate.DEFAULT_FOLDS,
    seed: int = 0,
    n_boot: int = validate.DEFAULT_BOOTSTRAP,
    labels: dict[str, str] | None = None,
    ray_address: str | None = None,
    batch_size: int = 32,
) -> dict:
    """Cross-validated metrics of one feature set under subject-grouped folds."""
    backbones = bb.parse_backbones(backbones or list(bb.DEFAULT_BACKBONES))
    bb.check_image_size(backbones, image_size)
    choice = bb.parse_weights(weights, weights_dir, seed)
    weight_ids = {name: bb.weights_id(bb.BACKBONES[name], choice) for name in backbones}
    root = open_location(store)

    rows = catalog_images(images, root, dataset, labels)
    labelled = [r for r in rows if r["status"] == STATUS_OK and r["label"] in ("all", "hem")]
    features = extract(root, labelled, backbones, choice, weight_ids, image_size, batch_size,
                       ray_address)  # fmt: skip
    usable = [r["image_id"] for r in labelled if r["image_id"] not in features["rejected"]]
    joined = join(root, usable, backbones, weight_ids, image_size)
    by_id = {r["image_id"]: r for r in labelled}
    y = evaluate.labels_to_int([by_id[i]["label"] for i in joined.image_ids])
    subjects = [by_id[i]["subject_id"] for i in joined.image_ids]
    result = cross_validate(joined.matrix, y, subjects, folds, seed, n_boot)
    non_clinical = bb.uses_random_weights(backbones, choice)
    return {
        **result,
        "dataset": dataset,
        "store": root.uri,
        "backbones": backbones,
        "feature_dim": int(joined.matrix.shape[1]),
        "weights_id": ",".join(weight_ids[n] for n in backbones),
        "image_size": image_size,
        "non_clinical": non_clinical,
        "note": NON_CLINICAL_NOTE if non_clinical else None,
        "created_at": datetime.now(UTC).isoformat(),
        "package_versions": package_versions(),
    }
