"""Prefect tasks of the nightly sweep and of backfills: thin wrappers, logging, progress, artifacts.

Stage logic lives in tasks.catalog, tasks.score, tasks.actors and tasks.join. Ray, TensorFlow and
scikit-learn are imported inside the tasks that need them, so a sweep that finds nothing new never
pays seconds of start-up for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from leukoflow.errors import LeukoflowError
from leukoflow.tasks import backbones as bb
from leukoflow.tasks import score as sc
from leukoflow.tasks.catalog import build_catalog, catalog_counts
from leukoflow.tasks.join import join_features
from leukoflow.tasks.lease import StoreLease
from leukoflow.tasks.pseudonym import pseudonymise_subjects, subject_salt
from leukoflow.tasks.storage import Location, open_location
from leukoflow.tasks.tables import (
    CATALOG_SCHEMA,
    STATUS_QUARANTINED,
    featurised_ids,
    read_catalog,
    write_catalog,
    write_predictions,
)


@dataclass
class CatalogPass:
    """A catalog pass over a folder, and what changed since the previous one."""

    rows: list[dict]
    written: bool  # False when nothing changed since the last pass: the catalog was not rewritten
    new_files: int  # uris not in the previous catalog
    quarantined_new: int  # of those, the ones set aside


@task(name="catalog", cache_policy=NO_CACHE)
def catalog_collection(
    images: str,
    store: Location,
    dataset: str,
    labels: dict[str, str] | None = None,
    allow_empty: bool = False,
) -> CatalogPass:
    """Catalog a folder, reusing the rows of files unchanged since the last pass."""
    logger = get_run_logger()
    known = {row["uri"]: row for row in read_catalog(store, dataset).to_pylist()}
    rows = build_catalog(images, dataset, labels, known_rows=known, allow_empty=allow_empty)
    fresh = [row for row in rows if row["uri"] not in known]
    columns = CATALOG_SCHEMA.names
    changed = len(rows) != len(known) or any(
        [known.get(r["uri"], {}).get(c) for c in columns] != [r.get(c) for c in columns]
        for r in rows
    )
    if changed:
        write_catalog(store, dataset, rows)
    counts = catalog_counts(rows)
    logger.info(
        "catalog %s: %d files (%d new since the last pass), %d ok, %d quarantined, %d duplicate%s",
        dataset, len(rows), len(fresh), counts["ok"], counts["quarantined"], counts["duplicate"],
        "" if changed else "; unchanged, not rewritten",
    )  # fmt: skip
    for reason, n in counts.get("reasons", {}).items():
        logger.warning("catalog: %d image(s) set aside: %s", n, reason)
    quarantined_new = sum(row["status"] == STATUS_QUARANTINED for row in fresh)
    return CatalogPass(rows, changed, len(fresh), quarantined_new)


@task(name="missing-features", cache_policy=NO_CACHE)
def missing_vectors(
    store: Location,
    image_ids: list[str],
    backbones: list[str],
    weight_ids: dict[str, str],
    image_size: int,
) -> dict[str, list[str]]:
    """Per backbone, the ids without a vector of this recipe (only backbones with work)."""
    logger = get_run_logger()
    todo = {}
    for name in backbones:
        done = featurised_ids(store, name, weight_ids[name], image_size)
        missing = [i for i in image_ids if i not in done]
        if missing:
            todo[name] = missing
    logger.info("features to compute: %s", {n: len(ids) for n, ids in todo.items()} or "none")
    return todo


@dataclass(frozen=True)
class Compute:
    """Where the backbone actors run and how large a share each takes (docs/scaling.md)."""

    ray_address: str | None = None
    batch_size: int = 32
    gpu_share: float | None = None
    actor_cpus: float | None = None


@task(name="featurise", cache_policy=NO_CACHE)
def featurise(
    store: Location,
    uris: dict[str, str],
    todo: dict[str, list[str]],
    weights: bb.WeightsChoice,
    weight_ids: dict[str, str],
    image_size: int,
    compute: Compute,
    total_images: int,
    progress_bar: bool = False,
) -> dict:
    """Compute the missing vectors on Ray actors; Ray is never started when there are none."""
    empty = {"computed": {}, "rejected": {}, "seconds": 0.0, "images_per_second": None}
    if not any(todo.values()):
        return empty
    from leukoflow.tasks.actors import (  # imports Ray: only with work to do
        extract_features,
        ray_session,
    )

    pending = len({i for ids in todo.values() for i in ids})
    logger = get_run_logger()
    with progress_reporter(progress_bar, total_images, total_images - pending, logger) as report:
        with ray_session(compute.ray_address):
            result = extract_features(
                store, uris, todo, weights, weight_ids, image_size, compute.batch_size,
                gpu_share=compute.gpu_share, actor_cpus=compute.actor_cpus, on_progress=report,
            )  # fmt: skip
    rate = result.images_done / result.seconds if result.seconds else None
    logger.info("featurise: %s in %.1fs", result.computed, result.seconds)
    for image_id, reason in result.rejected.items():
        logger.warning("featurise: image %s set aside: %s", image_id[:12], reason)
    return {
        "computed": result.computed,
        "rejected": result.rejected,
        "seconds": round(result.seconds, 2),
        "images_per_second": rate and round(rate, 3),
    }


@task(name="score-new-images", cache_policy=NO_CACHE)
def score_new_images(
    store: Location,
    model_id: str,
    record: dict,
    recipe: sc.FeatureRecipe,
    rows: list[dict],
    night: str,
    run_id: str,
    chunk_size: int,
    lease: StoreLease,
) -> dict:
    """Score `rows` chunk by chunk, each chunk one atomic predictions file (resumable)."""
    from leukoflow.tasks import registry, train  # scikit-learn and skops: only with work to do

    logger = get_run_logger()
    model, _ = registry.load_model(store, model_id)
    sc.check_model_width(int(model.n_features_in_), recipe, model_id)
    moments, scores, missing = sc.FeatureMoments(), [], []
    for chunk in sc.chunks(rows, chunk_size):
        by_id = {row["image_id"]: row for row in chunk}
        joined = join_features(
            store, list(by_id), list(recipe.backbones), recipe.weights_ids, recipe.image_size
        )
        missing.extend(joined.missing)
        if not joined.image_ids:
            continue
        values, kind = train.decision_scores(model, joined.matrix)
        if kind != record.get("score_kind"):
            raise LeukoflowError(
                f"model {model_id} gives {kind} scores but its record says "
                f"{record.get('score_kind')}: the model file and its record disagree"
            )
        predictions = sc.prediction_rows(
            [by_id[i] for i in joined.image_ids], values, model_id, kind,
            float(record["threshold"]), run_id, datetime.now(UTC),
        )  # fmt: skip
        lease.ensure_held()  # never write after another sweep may have taken over
        write_predictions(store, night, run_id, predictions)
        moments.add(joined.matrix)
        scores.extend(np.asarray(values, dtype=np.float64).tolist())
        logger.info("scored %d/%d new images", len(scores), len(rows))
    if missing:
        logger.warning("%d image(s) lack features and were not scored", len(missing))
    return {"scored": moments.n, "missing": missing, "feature_mean": moments.mean(),
            "scores": scores}  # fmt: skip


@task(name="publish-sweep", cache_policy=NO_CACHE)
def publish_sweep(summary: dict) -> None:
    """The night at a glance in the Prefect UI: a markdown summary and the subject table."""
    description = f"{summary['date']}: model {summary['model_id']}, run {summary['run_id']}"
    create_markdown_artifact(
        markdown=sc.sweep_markdown(summary), key="nightly-sweep", description=description
    )
    # Subject ids can be patient identifiers: the UI shows pseudonymous keys (tasks/pseudonym).
    salt = subject_salt(open_location(summary["store"]))
    subjects = pseudonymise_subjects(summary["subjects"], salt)
    create_table_artifact(
        table=sc.subject_table(subjects), key="nightly-subjects", description=description
    )


# -- progress --------------------------------------------------------------------------------
@contextmanager
def progress_reporter(
    bar: bool, total: int, already_done: int, logger
) -> Iterator[Callable[[int, int], None]]:
    """A callback for extraction progress: a rich bar on stderr, or log lines."""
    started = time.perf_counter()

    def rate_and_eta(done: int, batch_total: int) -> tuple[float, float]:
        rate = done / max(time.perf_counter() - started, 1e-9)
        return rate, (batch_total - done) / rate if rate else float("nan")

    if not bar:

        def log_line(done: int, batch_total: int) -> None:
            rate, eta = rate_and_eta(done, batch_total)
            logger.info("featurise: %d/%d images, %.2f images/s, ETA %.0fs",
                        already_done + done, total, rate, eta)  # fmt: skip

        yield log_line
        return
    console = Console(stderr=True)
    columns = (
        TextColumn("featurising"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} images/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar_id = progress.add_task("featurise", total=total, completed=already_done, rate="-")
        last_line = [0.0]

        def advance(done: int, batch_total: int) -> None:
            rate, eta = rate_and_eta(done, batch_total)
            progress.update(bar_id, completed=already_done + done, rate=f"{rate:.2f}")
            # Without a terminal rich draws the bar only at the end: print a line now and then.
            quiet = time.perf_counter() - last_line[0] < 10 and done < batch_total
            if not console.is_terminal and not quiet:
                last_line[0] = time.perf_counter()
                console.print(f"featurising: {already_done + done}/{total} images, "
                              f"{rate:.2f} images/s, ETA {eta:.0f}s")  # fmt: skip

        yield advance
