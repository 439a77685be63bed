"""Thin Prefect @task wrapper over learn/validate."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from leukoflow.learn import validate


@task(name="cross-validate", cache_policy=NO_CACHE)
def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list,
    classifier: str,
    n_folds: int,
    seed: int,
    n_boot: int,
) -> dict:
    """Cell- and patient-level subject-grouped cross-validation, logged metric by metric."""
    logger = get_run_logger()
    result = validate.cross_validate(
        x, y, subjects, classifier, n_folds=n_folds, seed=seed, n_boot=n_boot
    )
    for key, value in result["metrics"].items():
        logger.info(
            "validate (cells): %s %.4f ± %.4f [%.4f, %.4f]",
            key, value["mean"], value["std"], value["low"], value["high"],
        )  # fmt: skip
    level = result["patient_level"]
    for key, value in level["metrics"].items():
        logger.info(
            "validate (patients): %s pooled %s [%s, %s] over %d patients, %d cells",
            key, _fmt(value["pooled"]), _fmt(value["low"]), _fmt(value["high"]),
            level["n_patients"], level["n_cells"],
        )  # fmt: skip
    for reason in level["excluded"].values():
        # The reason, not the id: raw subject ids stay in the store.
        logger.warning("validate: a subject is left out of patient-level metrics: %s", reason)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
