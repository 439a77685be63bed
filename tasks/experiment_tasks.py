"""The experiments flow's engine side: Prefect tasks, and the Ray tasks that run grid cells.

The grid logic is in learn/experiments (plain functions); here each cell becomes one Ray task
over a single shared copy of the feature matrices (ray.put once, read by every task), and the
results are written to the store as CSV, Markdown, HTML and JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import ray
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from leukoflow.engine.actors import ray_session
from leukoflow.errors import LeukoflowError
from leukoflow.learn import experiments as ex
from leukoflow.learn import folds
from leukoflow.present.report import render_experiments_html
from leukoflow.store.storage import Location, write_json_atomic, write_text_atomic
from leukoflow.store.tables import CatalogRow, read_catalog_rows


@task(name="read-catalog", cache_policy=NO_CACHE)
def stored_catalog(store: Location, dataset: str) -> list[CatalogRow]:
    """The stored catalog of `dataset`: experiments run on what `leukoflow run` catalogued."""
    rows = read_catalog_rows(store, dataset)
    if not rows:
        raise LeukoflowError(
            f"no catalog for dataset {dataset!r} in {store.uri}; catalogue it first with "
            f"`leukoflow run IMAGES --store {store.uri} --dataset {dataset}`"
        )
    get_run_logger().info("catalog: %d rows for dataset %s", len(rows), dataset)
    return rows


@ray.remote(num_cpus=1)
def _evaluate_cell(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list,
    augmented: folds.Augmented | None,
    columns: np.ndarray,
    cell: ex.Cell,
    evaluation: ex.Evaluation,
    seed: int,
    n_boot: int,
) -> dict:
    return ex.evaluate_cell(x, y, subjects, columns, cell, evaluation, augmented, seed, n_boot)


def run_cells(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list,
    augmented: folds.Augmented | None,
    backbones: list[str],
    dims: list[int],
    cells: list[ex.Cell],
    evaluations: list[ex.Evaluation],
    seed: int,
    n_boot: int,
    on_result: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Every cell as its own Ray task (needs a Ray session); results in the order of `cells`."""
    shared = [ray.put(value) for value in (x, y, subjects, augmented)]
    plans = {evaluation.name: ray.put(evaluation) for evaluation in evaluations}
    pending = {}
    for index, cell in enumerate(cells):
        columns = ex.feature_columns(cell.feature_set, backbones, dims)
        ref = _evaluate_cell.remote(*shared, columns, cell, plans[cell.evaluation], seed, n_boot)
        pending[ref] = index
    results: list[dict] = [{} for _ in cells]
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        for ref in done:
            results[pending[ref]] = ray.get(ref)
            if on_result:
                on_result(len(cells) - len(waiting), results[pending[ref]])
    return results


@task(name="experiment-grid", cache_policy=NO_CACHE)
def evaluate_grid(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list,
    augmented: folds.Augmented | None,
    backbones: list[str],
    dims: list[int],
    cells: list[ex.Cell],
    evaluations: list[ex.Evaluation],
    seed: int,
    n_boot: int,
    ray_address: str | None,
) -> list[dict]:
    """Run the grid on the Ray cluster (or a local Ray), logging each finished cell."""
    logger = get_run_logger()
    started = time.perf_counter()
    logger.info("grid: %d cells on %d images x %d features", len(cells), len(y), x.shape[1])

    def progress(done: int, result: dict) -> None:
        accuracy = result["metrics"]["accuracy"]["mean"]
        logger.info(
            "grid: %d/%d %s %s (%s): accuracy %s, %.1fs",
            done,
            len(cells),
            result["feature_set"],
            result["classifier"],
            result["evaluation"],
            "n/a" if accuracy is None else f"{accuracy:.4f}",
            result["seconds"],
        )

    with ray_session(ray_address):
        results = run_cells(
            x, y, subjects, augmented, backbones, dims, cells, evaluations, seed, n_boot, progress
        )
    logger.info("grid: done in %.1fs", time.perf_counter() - started)
    return results


def experiment_folder(store: Location, experiment_id: str) -> Location:
    return store.child("experiments", experiment_id)


@task(name="experiment-report", cache_policy=NO_CACHE)
def save_experiment(store: Location, experiment_id: str, summary: dict) -> dict[str, str]:
    """Write one CSV per evaluation, the Markdown and HTML reports and results.json."""
    folder = experiment_folder(store, experiment_id)
    paths = {}
    for evaluation in summary["evaluations"]:
        name = evaluation["name"]
        rows = ex.table_rows(ex.results_for(summary["cells"], name))
        loc = folder.child(f"grid_{name}.csv")
        write_text_atomic(loc, ex.to_csv(rows))
        paths[f"csv_{name}"] = loc.uri
    markdown = ex.experiments_markdown(summary)
    for key, name, text in (
        ("report_md", "report.md", markdown),
        ("report_html", "report.html", render_experiments_html(summary)),
    ):
        loc = folder.child(name)
        write_text_atomic(loc, text)
        paths[key] = loc.uri
    results = folder.child("results.json")
    paths["results"] = results.uri
    write_json_atomic(results, {**summary, "paths": paths})
    create_markdown_artifact(markdown=markdown, key="experiments-report", description=experiment_id)
    best = [
        summary["cells"][i]
        for evaluation in summary["evaluations"]
        if (i := _best_index(summary["cells"], evaluation["name"])) is not None
    ]
    create_table_artifact(
        key="experiments-best",
        table=[
            {
                "evaluation": r["evaluation"],
                "features": r["feature_set"],
                "classifier": r["classifier"],
                "accuracy": r["metrics"]["accuracy"]["mean"],
                "f1": r["metrics"]["f1"]["mean"],
            }
            for r in best
        ],
        description=experiment_id,
    )
    return paths


def _best_index(cells: list[dict], evaluation: str) -> int | None:
    indices = [i for i, c in enumerate(cells) if c["evaluation"] == evaluation]
    best = ex.best_cell([cells[i] for i in indices])
    return None if best is None else indices[best]
