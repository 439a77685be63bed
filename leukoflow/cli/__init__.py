"""The `leukoflow` command line: a thin layer over the flows.

Exit status: 0 done (also when images were quarantined), 1 the run failed, 2 bad usage or
configuration (one line on stderr, no traceback). With --json the last line of stdout is one JSON
object with the run's counts, metrics, ids and paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer

from leukoflow.errors import LeukoflowError, StoreUnavailable

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

# -- shared options --------------------------------------------------------------------------
Store = Annotated[str, typer.Option("--store", help="Store root: a folder or s3://bucket/prefix")]
Dataset = Annotated[str, typer.Option("--dataset", help="Dataset name recorded in the catalog")]
Backbones = Annotated[
    str,
    typer.Option(help="Comma list, in concatenation order (vgg16, vgg19, resnet101, "
                 "mobilenet_v2, densenet121, inception_resnet_v2)"),
]  # fmt: skip
Weights = Annotated[str, typer.Option(help="imagenet, none (random init: non-clinical) or DIR")]
WeightsDir = Annotated[
    str | None, typer.Option("--weights-dir", help="Folder with the Keras notop .h5 files")
]
ImageSize = Annotated[int, typer.Option("--image-size", help="Square input size in pixels")]
Classifier = Annotated[
    str, typer.Option(help="linear-svm (the paper's), rbf-svm, knn, tree, forest or mlp")
]
Split = Annotated[str, typer.Option(help="random (the paper's 90/10) or subject (honest)")]
Seed = Annotated[int, typer.Option(help="Seed for splits, random init and classifiers")]
RayAddress = Annotated[
    str | None,
    typer.Option("--ray-address", help="An existing Ray cluster (default: $RAY_ADDRESS or local)"),
]
Labels = Annotated[
    str | None,
    typer.Option(
        help="Folder-to-label mapping, e.g. blast=all,normal=hem (default all=all,hem=hem)"
    ),
]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per extraction batch")]
GpuShare = Annotated[
    float | None,
    typer.Option(
        "--gpu-share",
        help="GPUs per backbone actor where the cluster has GPUs, e.g. 0.33 puts three "
        "backbones on one card (default: 1 / number of backbones)",
    ),
]
ActorCpus = Annotated[
    float | None,
    typer.Option(
        "--actor-cpus",
        help="CPUs per backbone actor (default: on CPU-only clusters, the smallest node's "
        "cores shared between the actors; 1 beside a GPU)",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="End stdout with one JSON summary line")]
TargetSensitivity = Annotated[
    float,
    typer.Option(
        "--target-sensitivity",
        help="Sensitivity for ALL the screening threshold must reach on validation folds",
    ),
]

DEFAULT_BACKBONES = "vgg16,densenet121,inception_resnet_v2"


def _quiet_environment() -> None:
    """No telemetry, no TensorFlow chatter; set before Prefect or TensorFlow is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Prefect gives its ephemeral API 20 s to start; two sweeps starting at once on a busy
    # server can need more, and failing then would lose a night.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _parse_labels(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    mapping = {}
    for pair in text.split(","):
        folder, sep, label = pair.partition("=")
        if not sep or label.strip() not in ("all", "hem"):
            raise LeukoflowError(f"--labels wants folder=all|hem pairs; got {pair!r}")
        mapping[folder.strip()] = label.strip()
    return mapping


def _run(
    images: str,
    store: str,
    dataset: str,
    backbones: str,
    weights: str,
    weights_dir: str | None,
    image_size: int,
    classifier: str,
    split: str,
    seed: int,
    ray_address: str | None,
    labels: str | None,
    batch_size: int,
    target_sensitivity: float = 0.95,
    gpu_share: float | None = None,
    actor_cpus: float | None = None,
) -> dict:
    from leukoflow.tasks import calibration, train

    names = _check_feature_recipe(backbones, image_size, weights, weights_dir, seed)
    train.make_classifier(classifier)
    train.check_split(split)
    calibration.check_target_sensitivity(target_sensitivity)
    _check_actor_shares(gpu_share, actor_cpus)
    label_map = _parse_labels(labels)
    _check_store(store)

    from leukoflow.flows.run import run_pipeline

    _hide_tracebacks_of_user_errors()
    return run_pipeline(
        images=images,
        store=store,
        dataset=dataset,
        backbones=names,
        weights=weights,
        weights_dir=weights_dir,
        image_size=image_size,
        classifier=classifier,
        split=split,
        seed=seed,
        labels=label_map,
        ray_address=ray_address,
        batch_size=batch_size,
        target_sensitivity=target_sensitivity,
        gpu_share=gpu_share,
        actor_cpus=actor_cpus,
    )


def _check_feature_recipe(
    backbones: str, image_size: int, weights: str, weights_dir: str | None, seed: int
) -> list[str]:
    """The backbone names, once the recipe is known to be buildable: fail fast, before any
    engine starts, on a name, size or weights file a user got wrong."""
    from leukoflow.tasks import backbones as bb

    names = bb.parse_backbones(backbones)
    bb.check_image_size(names, image_size)
    choice = bb.parse_weights(weights, weights_dir, seed)
    for name in names:
        bb.weights_id(bb.BACKBONES[name], choice)
    return names


def _check_actor_shares(gpu_share: float | None, actor_cpus: float | None) -> None:
    if gpu_share is None and actor_cpus is None:
        return  # the defaults (and a sweep with nothing new never imports Ray)
    from leukoflow.tasks.actors import check_actor_resources

    check_actor_resources(gpu_share, actor_cpus)


def _check_store(store: str) -> None:
    """An unreachable or missing store is a configuration error: say so before any work."""
    from leukoflow.tasks.storage import check_store, open_location

    check_store(open_location(store))


def _print_run_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    from leukoflow.summary import render_run_summary

    render_run_summary(summary)


@app.command()
def run(
    images: Annotated[str, typer.Argument(help="Folder (C-NMC or class folders) or CSV manifest")],
    store: Store,
    dataset: Dataset = "default",
    backbones: Backbones = DEFAULT_BACKBONES,
    weights: Weights = "imagenet",
    weights_dir: WeightsDir = None,
    image_size: ImageSize = 224,
    classifier: Classifier = "linear-svm",
    split: Split = "random",
    seed: Seed = 0,
    ray_address: RayAddress = None,
    labels: Labels = None,
    batch_size: BatchSize = 32,
    target_sensitivity: TargetSensitivity = 0.95,
    gpu_share: GpuShare = None,
    actor_cpus: ActorCpus = None,
    as_json: AsJson = False,
) -> None:
    """Catalog -> extract -> join -> train -> evaluate -> report on a collection of images."""
    summary = _run(
        images, store, dataset, backbones, weights, weights_dir, image_size, classifier,
        split, seed, ray_address, labels, batch_size, target_sensitivity,
        gpu_share=gpu_share, actor_cpus=actor_cpus,
    )  # fmt: skip
    _print_run_summary(summary, as_json)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the synthetic images and the store")] = Path(
        "demo-output"
    ),
    subjects: Annotated[int, typer.Option(help="Synthetic subjects (half ALL)")] = 8,
    cells_per_subject: Annotated[int, typer.Option("--cells-per-subject")] = 12,
    backbones: Backbones = DEFAULT_BACKBONES,
    weights: Weights = "none",
    weights_dir: WeightsDir = None,
    image_size: ImageSize = 224,
    classifier: Classifier = "linear-svm",
    split: Split = "random",
    seed: Seed = 0,
    ray_address: RayAddress = None,
    as_json: AsJson = False,
) -> None:
    """Make a small synthetic C-NMC-like dataset and run the whole pipeline on it."""
    from leukoflow.tasks.synthetic import make_synthetic_dataset

    images = make_synthetic_dataset(
        out / "images", n_subjects=subjects, cells_per_subject=cells_per_subject, seed=seed
    )
    summary = _run(
        str(images), str(out / "store"), "synthetic-demo", backbones, weights, weights_dir,
        image_size, classifier, split, seed, ray_address, None, 32,
    )  # fmt: skip
    _print_run_summary(summary, as_json)


@app.command()
def status(store: Store, as_json: AsJson = False) -> None:
    """What the store holds: catalog, features, models, predictions, runs."""
    from leukoflow.summary import render_status, store_status
    from leukoflow.tasks.storage import open_location

    report = store_status(open_location(store))
    if as_json:
        print(json.dumps(report, default=str))
    else:
        render_status(report)


# -- nightly sweep, backfills, ops dashboard (docs/nightly.md) -------------------------------
@app.command()
def score(
    inbox: Annotated[str, typer.Argument(help="Folder or s3:// prefix where new images land")],
    store: Store,
    model: Annotated[str, typer.Option(help="Model id, or current")] = "current",
    date: Annotated[
        str | None, typer.Option(help="Night YYYY-MM-DD of the predictions (default: today, UTC)")
    ] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="Catalog name of the inbox")] = "inbox",
    weights_dir: WeightsDir = None,
    ray_address: RayAddress = None,
    batch_size: BatchSize = 32,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Images per predictions file (what a kill redoes)")
    ] = 256,
    min_flagged_cells: Annotated[
        int,
        typer.Option("--min-flagged-cells", help="Flag a subject with >= K flagged cells (0: off)"),
    ] = 5,
    min_flagged_fraction: Annotated[
        float,
        typer.Option(
            "--min-flagged-fraction", help="... or with more than F of its cells flagged (1: off)"
        ),
    ] = 0.5,
    feature_drift_threshold: Annotated[
        float,
        typer.Option("--feature-drift-threshold", help="Warn above this mean |z| of feature means"),
    ] = 1.0,
    score_drift_threshold: Annotated[
        float, typer.Option("--score-drift-threshold", help="Warn above this KS distance of scores")
    ] = 0.5,
    drift_min_cells: Annotated[
        int,
        typer.Option("--drift-min-cells", help="Fewer new cells: drift is shown, never a warning"),
    ] = 20,
    backbones: Annotated[
        str | None, typer.Option(help="Expected backbones, in order: refuse a model with others")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Expected image size: refuse others")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Expected weights kind (imagenet or none): refuse others")
    ] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait while another sweep holds the store (0: exit)")
    ] = 0.0,
    lease_ttl: Annotated[
        float, typer.Option("--lease-ttl", help="Seconds a killed sweep's lease blocks others")
    ] = 300.0,
    explain_flagged: Annotated[
        bool,
        typer.Option(
            "--explain-flagged",
            help="Write activation-map PNGs of flagged cells under STORE/explanations/",
        ),
    ] = False,
    gpu_share: GpuShare = None,
    actor_cpus: ActorCpus = None,
    as_json: AsJson = False,
) -> None:
    """The nightly sweep: score the images of INBOX that the model has not scored yet."""
    from datetime import UTC, datetime

    from leukoflow.tasks import backbones as bb
    from leukoflow.tasks import score as sc

    # Fail fast, before Prefect starts, on anything a user can get wrong.
    sc.night_of(date, datetime.now(UTC))
    sc.SubjectRule(min_flagged_cells, min_flagged_fraction)
    sc.chunks([], chunk_size)
    expected = {
        "backbones": bb.parse_backbones(backbones) if backbones else None,
        "image_size": image_size,
        "weights": weights,
    }
    if weights not in (None, "imagenet", "none"):
        raise LeukoflowError(f"--weights for score is imagenet or none; got {weights!r}")
    _check_actor_shares(gpu_share, actor_cpus)
    _check_store(store)

    from leukoflow.flows.score import score_inbox

    _hide_tracebacks_of_user_errors()
    summary = score_inbox(
        inbox=inbox, store=store, model=model, date=date, dataset=dataset,
        weights_dir=weights_dir, ray_address=ray_address, batch_size=batch_size,
        chunk_size=chunk_size, min_flagged_cells=min_flagged_cells,
        min_flagged_fraction=min_flagged_fraction,
        feature_drift_threshold=feature_drift_threshold,
        score_drift_threshold=score_drift_threshold, drift_min_cells=drift_min_cells,
        expected_recipe=expected, wait_s=wait, lease_ttl_s=lease_ttl,
        explain_flagged=explain_flagged, gpu_share=gpu_share, actor_cpus=actor_cpus,
    )  # fmt: skip
    if summary["outcome"] == "busy":
        print(f"leukoflow: {summary['message']}", file=sys.stderr)
    if as_json:
        print(json.dumps(summary, default=str))
    elif summary["outcome"] != "busy":
        from leukoflow.summary import render_score_summary

        render_score_summary(summary)


@app.command()
def backfill(
    images: Annotated[str, typer.Argument(help="Folder (C-NMC or class folders) or CSV manifest")],
    store: Store,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset name recorded in the catalog")],
    backbones: Backbones = DEFAULT_BACKBONES,
    weights: Weights = "imagenet",
    weights_dir: WeightsDir = None,
    image_size: ImageSize = 224,
    seed: Seed = 0,
    labels: Labels = None,
    ray_address: RayAddress = None,
    batch_size: BatchSize = 32,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr")
    ] = True,
    gpu_share: GpuShare = None,
    actor_cpus: ActorCpus = None,
    as_json: AsJson = False,
) -> None:
    """Catalog and featurise a whole collection; a re-run computes only what the store lacks."""
    names = _check_feature_recipe(backbones, image_size, weights, weights_dir, seed)
    _check_actor_shares(gpu_share, actor_cpus)
    label_map = _parse_labels(labels)

    from leukoflow.flows.backfill import backfill as backfill_flow

    _hide_tracebacks_of_user_errors()
    summary = backfill_flow(
        images=images, store=store, dataset=dataset, backbones=names, weights=weights,
        weights_dir=weights_dir, image_size=image_size, seed=seed, labels=label_map,
        ray_address=ray_address, batch_size=batch_size, progress_bar=progress,
        gpu_share=gpu_share, actor_cpus=actor_cpus,
    )  # fmt: skip
    if as_json:
        print(json.dumps(summary, default=str))
        return
    from leukoflow.summary import render_backfill_summary

    render_backfill_summary(summary)


@app.command()
def dashboard(
    store: Store,
    out: Annotated[str, typer.Option(help="The HTML file to write (self-contained, offline)")],
    nights: Annotated[int, typer.Option(help="How many recent nights the plots show")] = 60,
    as_json: AsJson = False,
) -> None:
    """One offline HTML page of the nightly sweeps: plots over nights, the last subject table."""
    from leukoflow.tasks.dashboard import write_dashboard
    from leukoflow.tasks.storage import open_location

    facts = write_dashboard(open_location(store), open_location(out), nights)
    if as_json:
        print(json.dumps(facts, default=str))
    else:
        print(f"dashboard: {facts['nights']} night(s), {facts['runs']} run(s) -> {facts['path']}")


@app.command()
def explain(
    image: Annotated[str, typer.Argument(help="An image file (local or s3://) or a catalog id")],
    store: Store,
    model: Annotated[str, typer.Option(help="Model id, or current")] = "current",
    out: Annotated[
        str | None, typer.Option(help="PNG to write (default: ./<image name>-explained.png)")
    ] = None,
    weights_dir: WeightsDir = None,
    as_json: AsJson = False,
) -> None:
    """One cell's class activation maps under a linear model, as a PNG (docs/explanations.md)."""
    from leukoflow.tasks.explain import explain_image

    result = explain_image(store, image, model=model, out=out, weights_dir=weights_dir)
    if as_json:
        print(json.dumps(result, default=str))
        return
    if result["non_clinical"]:
        print("NOT CLINICALLY MEANINGFUL: random-initialised networks (--weights none)")
    parts = ", ".join(f"{k} {v:+.3f}" for k, v in result["contributions"].items())
    print(f"{result['predicted_label']}: {result['score_kind']} {result['score']:.4f} ({parts})")
    print(result["png"])


@app.command()
def validate(
    images: Annotated[str, typer.Argument(help="Folder (C-NMC or class folders) or CSV manifest")],
    store: Store,
    dataset: Dataset = "default",
    backbones: Backbones = DEFAULT_BACKBONES,
    weights: Weights = "imagenet",
    weights_dir: WeightsDir = None,
    image_size: ImageSize = 224,
    folds: Annotated[int, typer.Option(help="Subject-grouped folds")] = 5,
    seed: Seed = 0,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Subject bootstrap resamples")] = 1000,
    ray_address: RayAddress = None,
    batch_size: BatchSize = 32,
    as_json: AsJson = False,
) -> None:
    """Subject-grouped k-fold metrics of one feature set with the paper's linear SVM."""
    names = _check_feature_recipe(backbones, image_size, weights, weights_dir, seed)

    from leukoflow.flows.validate import run_validation

    _hide_tracebacks_of_user_errors()
    summary = run_validation(
        images=images, store=store, dataset=dataset, backbones=names, weights=weights,
        weights_dir=weights_dir, image_size=image_size, folds=folds, seed=seed, n_boot=n_boot,
        ray_address=ray_address, batch_size=batch_size,
    )  # fmt: skip
    if as_json:
        print(json.dumps(summary, default=str))
        return
    if summary["note"]:
        print(summary["note"])
    print(
        f"{'+'.join(names)}: {summary['n_images']} cells, {summary['n_subjects']} subjects, "
        f"{summary['folds']} subject-grouped folds (mean ± std [95% subject bootstrap])"
    )
    for key, m in summary["metrics"].items():
        print(f"  {key:<18} {m['mean']:.4f} ± {m['std']:.4f} [{m['low']:.4f}, {m['high']:.4f}]")


PAPER_BACKBONES = "vgg16,vgg19,resnet101,mobilenet_v2,inception_resnet_v2,densenet121"
PAPER_CLASSIFIERS = "knn,linear-svm,rbf-svm,tree,forest,mlp"


@app.command()
def experiments(
    store: Store,
    dataset: Dataset = "default",
    backbones: Backbones = PAPER_BACKBONES,
    classifiers: Annotated[
        str, typer.Option(help="Comma list of knn, linear-svm, rbf-svm, tree, forest, mlp")
    ] = PAPER_CLASSIFIERS,
    split: Annotated[
        str, typer.Option(help="random (the paper's 90/10), subject (grouped k-fold) or both")
    ] = "both",
    trio: Annotated[
        str | None,
        typer.Option(help="The 3 backbones whose pairs and trio are tried (default: the paper's)"),
    ] = None,
    folds: Annotated[int, typer.Option(help="Folds of the subject-grouped evaluation")] = 5,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment", help="Train also on flipped and rotated copies (4x the extraction)"
        ),
    ] = False,
    weights: Weights = "imagenet",
    weights_dir: WeightsDir = None,
    image_size: ImageSize = 224,
    seed: Seed = 0,
    ray_address: RayAddress = None,
    batch_size: BatchSize = 32,
    as_json: AsJson = False,
) -> None:
    """The paper's grid (backbones, pairs, trio x classifiers) beside subject-grouped numbers."""
    from leukoflow.tasks import backbones as bb
    from leukoflow.tasks import experiments as ex

    names = _check_feature_recipe(backbones, image_size, weights, weights_dir, seed)
    classifier_names = ex.parse_classifiers(classifiers)
    ex.check_split_choice(split)
    trio_names = bb.parse_backbones(trio) if trio else None
    ex.feature_sets(names, trio_names)

    from leukoflow.flows.experiments import run_experiments

    _hide_tracebacks_of_user_errors()
    summary = run_experiments(
        store=store, dataset=dataset, backbones=names, classifiers=classifier_names,
        split=split, trio=trio_names, folds=folds, augment=augment, weights=weights,
        weights_dir=weights_dir, image_size=image_size, seed=seed, ray_address=ray_address,
        batch_size=batch_size,
    )  # fmt: skip
    if as_json:
        print(json.dumps(summary, default=str))
        return
    _print_experiments(summary)


def _print_experiments(summary: dict) -> None:
    """One compact table per evaluation (means, ± std over folds); intervals are in the report."""
    from rich.console import Console
    from rich.table import Table

    from leukoflow.tasks import experiments as ex

    console = Console()
    if summary.get("note"):
        console.print(f"[bold red]{summary['note']}[/]")
    for evaluation in summary["evaluations"]:
        header, rows, best = ex.display_table(
            ex.results_for(summary["cells"], evaluation["name"]), intervals=False
        )
        table = Table(title=evaluation["label"])
        for i, column in enumerate(header):
            table.add_column(column, justify="right" if i >= 2 else "left")
        for i, row in enumerate(rows):
            table.add_row(*row, style="bold green" if i == best else None)
        console.print(table)
    console.print(
        "best cell in bold green (highest accuracy, then F1); 95% intervals in the report"
    )
    for key, path in summary["paths"].items():
        console.print(f"{key}: {path}")


models_app = typer.Typer(no_args_is_help=True, help="The model registry: list, show, promote.")
app.add_typer(models_app, name="models")
ModelId = Annotated[str, typer.Argument(help="A model id, or current")]


@models_app.command("list")
def models_list(store: Store, as_json: AsJson = False) -> None:
    """Every model in the store, oldest first; the current one marked."""
    from rich.console import Console
    from rich.table import Table

    from leukoflow.tasks import registry
    from leukoflow.tasks.storage import open_location

    root = open_location(store)
    current = registry.current_model_id(root)
    rows = [registry.model_row(record, current) for record in registry.list_models(root)]
    if as_json:
        print(json.dumps({"store": root.uri, "current": current, "models": rows}, default=str))
        return
    table = Table(title=f"models in {root.uri} (* current)")
    columns = ("model_id", "dataset", "classifier", "backbones", "split")
    table.add_column("")
    table.add_column("model_id", overflow="fold")
    for column in (*columns[1:], "accuracy", "f1", "threshold"):
        table.add_column(column, justify="right" if column in ("accuracy", "f1") else "left")
    for row in rows:
        numbers = [_number(row[k]) for k in ("accuracy", "f1", "threshold")]
        table.add_row("*" if row["current"] else "", *(str(row[c]) for c in columns), *numbers)
    Console().print(table)


@models_app.command("show")
def models_show(model_id: ModelId, store: Store, as_json: AsJson = False) -> None:
    """One model's record: feature recipe, lineage, metrics and operating point."""
    from rich.console import Console
    from rich.table import Table

    from leukoflow.tasks import registry
    from leukoflow.tasks.storage import open_location

    root = open_location(store)
    record = registry.load_record(root, registry.resolve_model_id(root, model_id))
    current = registry.current_model_id(root)
    if as_json:
        shown = registry.describe(record)
        print(json.dumps({**shown, "current": record["model_id"] == current}, default=str))
        return
    console = Console()
    for title, items in registry.model_sections(record, current):
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("field")
        table.add_column("value")
        for name, value in items:
            table.add_row(name, _number(value) if isinstance(value, float) else _text(value))
        console.print(table)


@models_app.command("promote")
def models_promote(
    model_id: Annotated[str, typer.Argument(help="The model id to make current")],
    store: Store,
    as_json: AsJson = False,
) -> None:
    """Make MODEL_ID the model that scoring uses (one atomic write of CURRENT.json)."""
    from leukoflow.tasks import registry
    from leukoflow.tasks.storage import open_location

    pointer = registry.promote(open_location(store), model_id)
    if as_json:
        print(json.dumps(pointer, default=str))
    else:
        print(f"current model: {pointer['model_id']} (was {pointer['previous']})")


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return " / ".join(_number(v) for v in value)
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return "n/a" if value is None else str(value)


@app.command()
def deploy(
    store: Store,
    inbox: Annotated[str, typer.Option(help="Folder or s3:// prefix the nightly sweep scores")],
    timezone: Annotated[str, typer.Option(help="IANA time zone of the 02:00 nightly cron")] = "UTC",
    prefect_file: Annotated[
        str | None, typer.Option("--prefect-file", help="Default: deployments/prefect.yaml")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Register the nightly, backfill and train deployments with the Prefect server at
    $PREFECT_API_URL (and create the `leukoflow` process work pool if missing)."""
    from leukoflow.deploy import deploy as register

    report = register(store, inbox, timezone, prefect_file)
    if as_json:
        print(json.dumps(report, default=str))
        return
    pool = f"{report['work_pool']} ({'created' if report['work_pool_created'] else 'exists'})"
    print(f"Prefect API {report['api']}: work pool {pool}")
    for item in report["deployments"]:
        schedules = ", ".join(f"{s['cron']} {s['timezone']}" for s in item["schedules"])
        print(f"  {item['name']}: {item['entrypoint']} [{schedules or 'on demand'}]")
    print("Start a worker: prefect worker start --pool leukoflow")


class _UserErrorFilter(logging.Filter):
    """Prefect logs a failed task's traceback; a user error needs only its one-line message."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _user_error(error) is not None or isinstance(error, StoreUnavailable):
            record.exc_info = None
            record.exc_text = None
        return True


# Environment variables whose values are credentials: masked in whatever the CLI shows.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "RAY_AUTH_TOKEN",
)
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with credential values from the environment and user:password@ in URLs masked."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_USERINFO.sub(r"\1***@", text)


class _RedactSecrets(logging.Filter):
    """Last line of defence: no log line shows a credential, whoever wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a malformed record: logging reports it as such, leave it to that
        if redact(message) != message:
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def _hide_tracebacks_of_user_errors() -> None:
    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _UserErrorFilter) for f in handler.filters):
                handler.addFilter(_UserErrorFilter())
            if not any(isinstance(f, _RedactSecrets) for f in handler.filters):
                handler.addFilter(_RedactSecrets())


def _user_error(error: BaseException | None) -> LeukoflowError | None:
    """The LeukoflowError behind `error`, also when Ray wrapped it on the way from an actor."""
    if isinstance(error, LeukoflowError):
        return error
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, LeukoflowError) else None


def main() -> None:
    _quiet_environment()
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="leukoflow", standalone_mode=False)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.exceptions.Abort:
        print("leukoflow: aborted", file=sys.stderr)
        code = 1
    except click.ClickException as usage:
        usage.show()
        code = 2
    except Exception as error:  # the CLI boundary: map every failure to an exit status
        code = _report_failure(error)
    sys.exit(code if isinstance(code, int) else 0)


def _report_failure(error: BaseException) -> int:
    user_error = _user_error(error)
    if user_error is not None:
        print(f"leukoflow: error: {redact(str(user_error).splitlines()[0])}", file=sys.stderr)
        return 2
    if isinstance(error, StoreUnavailable):  # explained in one line; the store says why
        print(f"leukoflow: run failed: {redact(str(error).splitlines()[0])}", file=sys.stderr)
        return 1
    if os.environ.get("LEUKOFLOW_DEBUG"):
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr)
    else:
        logging.getLogger("leukoflow").debug("run failed", exc_info=error)
    print(
        redact(f"leukoflow: run failed: {type(error).__name__}: {error} "
               "(LEUKOFLOW_DEBUG=1 for details)"),
        file=sys.stderr,
    )  # fmt: skip
    return 1
