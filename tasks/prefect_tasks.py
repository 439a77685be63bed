"""Thin Prefect @task wrappers over the stage modules: logging, artifacts, nothing else.

Stage logic lives in plain modules (catalog, extract, join, train, evaluate, report); these wrappers
give each stage its place in the Prefect UI. Results stay in memory (NO_CACHE): the store is the
system of record, and re-runs skip work by reading it, not through Prefect's cache.
"""

from __future__ import annotations

import time

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from leukoflow.tasks import backbones as bb
from leukoflow.tasks import calibration, evaluate, registry, train
from leukoflow.tasks.actors import extract_features, missing_features, ray_session
from leukoflow.tasks.catalog import build_catalog, catalog_counts
from leukoflow.tasks.join import JoinedFeatures, join_features
from leukoflow.tasks.report import render_report
from leukoflow.tasks.storage import Location
from leukoflow.tasks.tables import STATUS_OK, write_catalog


@task(name="catalog", cache_policy=NO_CACHE)
def catalog_images(images: str, store: Location, dataset: str, labels: dict | None) -> list[dict]:
    logger = get_run_logger()
    rows = build_catalog(images, dataset, labels)
    write_catalog(store, dataset, rows)
    counts = catalog_counts(rows)
    logger.info("catalog: %s", {k: v for k, v in counts.items() if k != "reasons"})
    for reason, n in counts.get("reasons", {}).items():
        logger.warning("catalog: %d image(s) set aside: %s", n, reason)
    return rows


@task(name="extract", cache_policy=NO_CACHE)
def extract(
    store: Location,
    rows: list[dict],
    backbones: list[str],
    weights: bb.WeightsChoice,
    weight_ids: dict[str, str],
    image_size: int,
    batch_size: int,
    ray_address: str | None,
    gpu_share: float | None = None,
    actor_cpus: float | None = None,
) -> dict:
    """Featurise every ok image that lacks a vector; a re-run starts no model at all."""
    logger = get_run_logger()
    ok = [r for r in rows if r["status"] == STATUS_OK]
    uris = {r["image_id"]: r["uri"] for r in ok}
    todo = missing_features(store, backbones, weight_ids, image_size, list(uris))
    pending = {name: len(ids) for name, ids in todo.items()}
    logger.info("extract: vectors to compute per backbone %s", pending)
    if not any(pending.values()):
        return {"computed": {}, "rejected": {}, "seconds": 0.0, "images_per_second": None}
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        eta = (total - done) / rate if rate else float("nan")
        logger.info("extract: %d/%d images, %.2f images/s, ETA %.0fs", done, total, rate, eta)

    with ray_session(ray_address):
        result = extract_features(
            store, uris, todo, weights, weight_ids, image_size, batch_size,
            gpu_share=gpu_share, actor_cpus=actor_cpus, on_progress=progress,
        )  # fmt: skip
    rate = result.images_done / result.seconds if result.seconds else None
    logger.info("extract: done in %.1fs (%s images/s)", result.seconds, rate and round(rate, 2))
    return {
        "computed": result.computed,
        "rejected": result.rejected,
        "seconds": round(result.seconds, 2),
        "images_per_second": rate and round(rate, 3),
        "actor_nodes": result.actor_nodes,
        "actor_code_dirs": result.actor_code_dirs,
    }


@task(name="join", cache_policy=NO_CACHE)
def join(
    store: Location,
    image_ids: list[str],
    backbones: list[str],
    weight_ids: dict[str, str],
    image_size: int,
) -> JoinedFeatures:
    logger = get_run_logger()
    joined = join_features(store, image_ids, backbones, weight_ids, image_size)
    logger.info(
        "join: %d images x %d features (%s)",
        len(joined.image_ids),
        joined.matrix.shape[1],
        " + ".join(f"{n}:{d}" for n, d in zip(joined.backbones, joined.dims, strict=True)),
    )
    for image_id, absent in joined.missing.items():
        logger.warning("join: image %s lacks features of %s", image_id[:12], ", ".join(absent))
    return joined


@task(name="train-evaluate", cache_policy=NO_CACHE)
def train_and_evaluate(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list,
    classifier: str,
    split: str,
    seed: int,
    target_sensitivity: float = calibration.DEFAULT_TARGET_SENSITIVITY,
) -> dict:
    """Split, fit on the training side, score the held-out side; then calibrate and threshold.

    The plain classifier (the paper's) gives the headline metrics; the calibrated one is the
    model that is saved and scores new cells.
    """
    logger = get_run_logger()
    parts = train.split_rows(y, subjects, split, seed=seed)
    model = train.fit(classifier, x[parts.train], y[parts.train], seed)
    scores, score_kind = train.decision_scores(model, x[parts.test])
    y_pred = model.predict(x[parts.test])
    metrics = evaluate.compute_metrics(y[parts.test], y_pred, scores)
    logger.info(
        "evaluate (%s split, %d test cells): accuracy %.4f, F1 %.4f",
        split,
        len(parts.test),
        metrics["accuracy"],
        metrics["f1"],
    )
    calibrated = calibration.calibrate_and_choose_threshold(
        classifier,
        x[parts.train],
        y[parts.train],
        [subjects[i] for i in parts.train],
        x[parts.test],
        y[parts.test],
        target_sensitivity,
        seed=seed,
    )
    test = calibrated.summary["test"]
    logger.info(
        "calibration (%d %s folds): threshold %.4f for sensitivity >= %.2f; test sensitivity "
        "%s, specificity %s, Brier %.4f",
        calibrated.summary["folds"],
        calibrated.summary["grouping"],
        calibrated.threshold,
        target_sensitivity,
        test["sensitivity"],
        test["specificity"],
        test["brier"],
    )
    return {
        "model": calibrated.model,  # what is saved and what scoring uses
        "headline_model": model,
        "split": parts,
        "y_test": y[parts.test],
        "y_pred": y_pred,
        "scores": scores,
        "headline_score_kind": score_kind,
        "score_kind": "probability",
        "threshold": calibrated.threshold,
        "calibration": calibrated.summary,
        "test_probabilities": calibrated.test_probabilities,
        "metrics": metrics,
    }


@task(name="report", cache_policy=NO_CACHE)
def save_and_report(
    store: Location,
    model_id: str,
    fitted: dict,
    record: dict,
    summary: dict,
    examples: list[dict] | None = None,
) -> dict[str, str]:
    """Write the model, its record, metrics and reports; promote it; publish artifacts.

    `examples`: the report's gallery of test cells with activation maps (tasks/explain_tasks).
    """
    registry.save_model(store, model_id, fitted["model"], record)
    risk = {
        "summary": fitted["calibration"],
        "y_true": fitted["y_test"],
        "probabilities": fitted["test_probabilities"],
    }
    markdown, html = render_report(
        summary, fitted["y_test"], fitted["y_pred"], fitted["scores"], risk=risk, examples=examples
    )
    # Headline (paper's classifier) metrics at the top level; the calibrated model's beside them.
    metrics_file = {**fitted["metrics"], "calibrated": fitted["calibration"]}
    paths = {
        "model": registry.model_folder(store, model_id).uri,
        "metrics": registry.write_model_file(store, model_id, "metrics.json", metrics_file).uri,
        "report_md": registry.write_model_file(store, model_id, "report.md", markdown).uri,
        "report_html": registry.write_model_file(store, model_id, "report.html", html).uri,
    }
    registry.promote(store, model_id)
    metrics = fitted["metrics"]
    create_markdown_artifact(markdown=markdown, key="evaluation-report", description=model_id)
    create_table_artifact(
        key="evaluation-metrics",
        table=[
            *(
                {"metric": k, "value": metrics[k]}
                for k in ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc")
            ),
            {"metric": "threshold (calibrated)", "value": fitted["threshold"]},
            *(
                {"metric": name, "value": fitted["calibration"]["test"][k]}
                for k, name in (
                    ("sensitivity", "sensitivity at threshold"),
                    ("specificity", "specificity at threshold"),
                    ("brier", "Brier score (calibrated)"),
                )
            ),
        ],
        description=f"{model_id} ({summary['split']} split)",
    )
    return paths
