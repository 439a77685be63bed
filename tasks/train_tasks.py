"""Thin Prefect tasks of training: fit and measure, save with its report, promote.

The logic is in plain modules (learn/fit, store/registry, present/report); these wrappers log and
publish artifacts. Promotion is its own task so that the flow shows it as a step of its own.
"""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from leukoflow import choices
from leukoflow.learn.fit import FittedModel, fit_and_measure
from leukoflow.present.report import render_report
from leukoflow.store import registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import Location


@task(name="fit-and-measure", cache_policy=NO_CACHE)
def fit_model(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list,
    classifier: str,
    split: str,
    seed: int,
    target_sensitivity: float = choices.DEFAULT_TARGET_SENSITIVITY,
) -> FittedModel:
    """The saved model at its operating point, and the paper's plain classifier beside it."""
    logger = get_run_logger()
    fitted = fit_and_measure(x, y, subjects, classifier, split, seed, target_sensitivity)
    cells = fitted.operating_point["cells"]
    logger.info(
        "saved model (%s split, %d held-out cells): threshold %.4f, sensitivity %s, "
        "specificity %s",
        split, cells["n"], fitted.threshold, _num(cells["sensitivity"]),
        _num(cells["specificity"]),
    )  # fmt: skip
    patients = fitted.operating_point["patients"]
    if patients:
        logger.info(
            "patients (%d held out): sensitivity %s, specificity %s",
            patients["n_patients"], _num(patients["metrics"]["sensitivity"]["value"]),
            _num(patients["metrics"]["specificity"]["value"]),
        )  # fmt: skip
    logger.info(
        "paper's classifier (same split): accuracy %.4f, F1 %.4f",
        fitted.metrics["accuracy"],
        fitted.metrics["f1"],
    )
    return fitted


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@task(name="save-and-report", cache_policy=NO_CACHE)
def save_model(
    store: Location,
    model_id: str,
    fitted: FittedModel,
    record: ModelRecord,
    summary: dict,
    examples: list[dict] | None = None,
) -> dict[str, str]:
    """Write the model, its record, metrics and reports; publish artifacts. Does not promote.

    `examples`: the report's gallery of test cells with activation maps (tasks/explain_tasks).
    """
    registry.save_model(store, model_id, fitted.model, record)
    risk = {
        "summary": fitted.calibration,
        "y_true": fitted.y_test,
        "probabilities": fitted.test_probabilities,
    }
    # The report leads with what is deployed: the saved model at its operating point, per cell and
    # per patient; the paper's plain classifier on the same split follows for comparison.
    markdown, html = render_report(
        summary, fitted.y_test, fitted.paper_predictions, fitted.paper_scores, risk=risk,
        examples=examples, operating_point=fitted.operating_point,
    )  # fmt: skip
    metrics_file = {
        **fitted.metrics,  # the paper's classifier, as the paper reports it
        "calibrated": fitted.calibration,
        "operating_point": fitted.operating_point,
        "patient_rule": fitted.patient_rule,
    }
    paths = {
        "model": registry.model_folder(store, model_id).uri,
        "metrics": registry.write_model_file(store, model_id, "metrics.json", metrics_file).uri,
        "report_md": registry.write_model_file(store, model_id, "report.md", markdown).uri,
        "report_html": registry.write_model_file(store, model_id, "report.html", html).uri,
    }
    create_markdown_artifact(markdown=markdown, key="evaluation-report", description=model_id)
    create_table_artifact(
        key="evaluation-metrics", table=_metric_rows(fitted),
        description=f"{model_id} ({summary['split']} split)",
    )  # fmt: skip
    return paths


def _metric_rows(fitted: FittedModel) -> list[dict]:
    """The saved model's operating point first, then the paper's classifier."""
    point = fitted.operating_point
    rows = [{"metric": "threshold (calibrated)", "value": fitted.threshold}]
    for key in ("sensitivity", "specificity"):
        rows.append({"metric": f"{key} per cell", "value": point["cells"][key]})
    if point["patients"]:
        for key in ("sensitivity", "specificity"):
            value = point["patients"]["metrics"][key]["value"]
            rows.append({"metric": f"{key} per patient", "value": value})
    brier = fitted.calibration["test"]["brier"]
    rows.append({"metric": "Brier score (calibrated)", "value": brier})
    rows.extend(
        {"metric": f"paper's classifier: {k}", "value": fitted.metrics[k]}
        for k in ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc")
    )
    return rows


@task(name="promote", cache_policy=NO_CACHE)
def promote_model(store: Location, model_id: str, force: bool = False) -> dict:
    """Make `model_id` the current model (refused for a non-clinical model replacing a clinical
    one unless `force`); returns the new pointer."""
    pointer = registry.promote(store, model_id, force=force)
    get_run_logger().info("promoted %s to current", model_id)
    return pointer
