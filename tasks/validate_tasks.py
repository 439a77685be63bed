"""Thin Prefect @task wrapper over tasks/validate."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from leukoflow.tasks import validate


@task(name="cross-validate", cache_policy=NO_CACHE)
def cross_validate(
    x: np.ndarray, y: np.ndarray, subjects: list, n_folds: int, seed: int, n_boot: int
) -> dict:
    logger = get_run_logger()
    result = validate.cross_validate(x, y, subjects, n_folds=n_folds, seed=seed, n_boot=n_boot)
    for key, value in result["metrics"].items():
        logger.info(
            "validate: %s %.4f ± %.4f [%.4f, %.4f]",
            key, value["mean"], value["std"], value["low"], value["high"],
        )  # fmt: skip
    return result
