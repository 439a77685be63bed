"""The stages every flow shares, as thin Prefect tasks: catalog, missing vectors, featurise,
quarantine what extraction could not read, join; and `prepare_features`, the one chain of them
that `run`, `validate`, `experiments`, `backfill` and the nightly sweep all call.

One set, so no two flows can key vectors, count images or report progress differently. Stage
logic lives in plain modules (catalog, actors, join); these wrappers log, report progress and
give each stage its place in the Prefect UI.
Results stay in memory (NO_CACHE): the store is the system of record, and re-runs skip work by
reading it, not through Prefect's cache. Ray is imported only when there are vectors to compute,
so a sweep that finds nothing new never pays its start-up.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from leukoflow.features.catalog import build_catalog, catalog_counts
from leukoflow.features.extract import ExtractionResult
from leukoflow.features.join import JoinedFeatures, featurised_images, join_features
from leukoflow.features.join import missing_vectors as vectors_missing
from leukoflow.recipe import Compute, FeatureRecipe
from leukoflow.store import records
from leukoflow.store.storage import Location
from leukoflow.store.tables import CatalogRow, read_catalog_rows, write_catalog
from leukoflow.vocabulary import ImageStatus, short_id


@dataclass
class CatalogPass:
    """A catalog pass over a collection, and what changed since the previous one."""

    rows: list[CatalogRow]
    written: bool  # False when nothing changed since the last pass: the catalog was not rewritten
    new_files: int  # uris not in the previous catalog
    quarantined_new: int  # of those, the ones set aside
    counts: dict = field(default_factory=dict)  # catalog_counts(rows), ignored files included


@task(name="catalog", cache_policy=NO_CACHE)
def catalog_images(
    images: str | list[str],
    store: Location,
    dataset: str,
    labels: dict[str, str] | None = None,
    allow_empty: bool = False,
) -> CatalogPass:
    """Catalog one or more folders/manifests, reusing the rows of files unchanged since the last
    pass (the catalog is rewritten only when something changed)."""
    logger = get_run_logger()
    known = {row.uri: row for row in read_catalog_rows(store, dataset)}
    rows = build_catalog(images, dataset, labels, known_rows=known, allow_empty=allow_empty)
    fresh = [row for row in rows if row.uri not in known]
    changed = len(rows) != len(known) or any(known.get(row.uri) != row for row in rows)
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
    if counts.get("ignored"):
        logger.warning("catalog: %d file(s) ignored: not images", counts["ignored"])
    quarantined_new = sum(row.status == ImageStatus.QUARANTINED for row in fresh)
    return CatalogPass(rows, changed, len(fresh), quarantined_new, counts)


@task(name="quarantine-rejects", cache_policy=NO_CACHE)
def quarantine_rejects(
    store: Location, dataset: str, rows: list[CatalogRow], rejected: dict[str, str]
) -> list[CatalogRow]:
    """Record in the catalog the images extraction could not read (changed or unreadable since
    they were catalogued): quarantined with extraction's reason, so the store itself says what
    became of them. Returns the rows as written."""
    hit = [r for r in rows if r.ok and r.image_id in rejected]
    if not hit:
        return rows
    updated = [
        r.quarantined(rejected[r.image_id]) if r.ok and r.image_id in rejected else r for r in rows
    ]
    write_catalog(store, dataset, updated)
    get_run_logger().warning("catalog %s: %d image(s) quarantined at extraction", dataset, len(hit))
    return updated


@task(name="missing-vectors", cache_policy=NO_CACHE)
def missing_vectors(
    store: Location, image_ids: list[str], recipe: FeatureRecipe
) -> dict[str, list[str]]:
    """Per backbone, the ids without a vector of `recipe` (only backbones with work)."""
    logger = get_run_logger()
    todo = vectors_missing(store, recipe, image_ids)
    logger.info("vectors to compute: %s", {n: len(ids) for n, ids in todo.items()} or "none")
    return todo


@task(name="featurise", cache_policy=NO_CACHE)
def featurise(
    store: Location,
    uris: dict[str, str],
    todo: dict[str, list[str]],
    recipe: FeatureRecipe,
    compute: Compute,
    total_images: int | None = None,
    progress_bar: bool | None = None,
    pool=None,
) -> ExtractionResult:
    """Compute the missing vectors on Ray actors; Ray is never started when there are none.

    `pool` (engine/actors.BackbonePool): take the actors from it and leave them running, so the
    explanations that follow reuse the networks; without, the actors live for this stage only.
    `progress_bar` None: a bar when stderr is a terminal, log lines otherwise.
    """
    if not any(todo.values()):
        return ExtractionResult()
    from leukoflow.engine.actors import extract_features, ray_session  # Ray: only with work

    pending = len({i for ids in todo.values() for i in ids})
    total = total_images if total_images is not None else pending
    logger = get_run_logger()
    bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    with progress_reporter(bar, total, total - pending, logger) as report:
        if pool is not None:  # the pool holds (or starts) its own Ray session
            result = extract_features(store, uris, todo, recipe, compute, on_progress=report,
                                      pool=pool)  # fmt: skip
        else:
            with ray_session(compute.ray_address):
                result = extract_features(store, uris, todo, recipe, compute, on_progress=report)
    rate = result.images_per_second
    logger.info(
        "featurise: %s in %.1fs (%s images/s)", result.computed, result.seconds,
        rate and round(rate, 2),
    )  # fmt: skip
    for image_id, reason in result.rejected.items():
        logger.warning("featurise: image %s set aside: %s", short_id(image_id), reason)
    return result


@task(name="join", cache_policy=NO_CACHE)
def join(store: Location, image_ids: list[str], recipe: FeatureRecipe) -> JoinedFeatures:
    """One row per image that has every backbone's vector; the rest are named in `missing`."""
    logger = get_run_logger()
    joined = join_features(store, image_ids, recipe)
    logger.info(
        "join: %d images x %d features (%s)",
        len(joined.image_ids),
        joined.matrix.shape[1],
        " + ".join(f"{n}:{d}" for n, d in zip(joined.backbones, joined.dims, strict=True)),
    )
    for image_id, absent in joined.missing.items():
        logger.warning("join: image %s lacks features of %s", short_id(image_id), ", ".join(absent))
    return joined


# -- the one feature-preparation step ------------------------------------------------------------
RowSelection = Callable[[list[CatalogRow]], list[CatalogRow]]


def ok_rows(rows: Sequence[CatalogRow]) -> list[CatalogRow]:
    """The catalog rows whose images decoded (what every flow featurises unless told otherwise)."""
    return [row for row in rows if row.ok]


@dataclass
class PreparedFeatures:
    """What `prepare_features` hands a flow."""

    catalog: CatalogPass | None  # this pass over the images (None: the stored catalog was read)
    rows: list[CatalogRow]  # the dataset's catalog as written, extraction's rejects quarantined
    selected: list[CatalogRow]  # the rows that were to hold vectors, rejects left out
    todo: dict[str, list[str]]  # per backbone, the ids that lacked a vector before extraction
    extraction: ExtractionResult
    joined: JoinedFeatures | None  # the joined rows' matrix and ids (None: not asked to join)
    counts: records.Accounting | None  # every row counted against the vectors (None: not asked)

    @property
    def rejected(self) -> dict[str, str]:
        """Images extraction could not read (changed or unreadable since the catalog), with why."""
        return self.extraction.rejected


def prepare_features(
    root: Location,
    dataset: str,
    recipe: FeatureRecipe,
    compute: Compute,
    *,
    images: str | list[str] | None = None,
    rows: list[CatalogRow] | None = None,
    labels: dict[str, str] | None = None,
    allow_empty: bool = False,
    select: RowSelection = ok_rows,
    also: Sequence[CatalogRow] = (),
    join_rows: RowSelection | None = None,
    count: bool = True,
    progress_bar: bool | None = None,
    pool=None,
) -> PreparedFeatures:
    """Catalog -> what is missing -> featurise (with progress) -> quarantine rejects -> join.

    The images are catalogued from `images` (folders or manifests), or `rows` are taken as the
    dataset's catalog. `select` picks the rows that must hold a vector of every backbone (and
    `also`, rows outside the catalog such as augmented copies); `join_rows` picks those to join
    into one matrix (None: no join). `count`: measure every row against the stored vectors.
    """
    catalog = None
    if rows is None:
        catalog = catalog_images(images, root, dataset, labels, allow_empty)
        rows = catalog.rows
    wanted = [*select(rows), *also]
    uris = {row.image_id: row.uri for row in wanted}
    todo = missing_vectors(root, list(uris), recipe)
    extraction = featurise(
        root, uris, todo, recipe, compute, total_images=len(uris), progress_bar=progress_bar,
        pool=pool,
    )  # fmt: skip
    rejected = extraction.rejected
    rows = quarantine_rejects(root, dataset, rows, rejected)
    joined = None
    if join_rows is not None:
        joined = join(
            root, [r.image_id for r in join_rows(rows) if r.image_id not in rejected], recipe
        )
    counts = records.account(rows, rejected, featurised_images(root, recipe)) if count else None
    selected = [row for row in select(rows) if row.image_id not in rejected]
    return PreparedFeatures(catalog, rows, selected, todo, extraction, joined, counts)


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
