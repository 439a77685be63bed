"""The `leukoflow` command line: a thin layer over the flows.

Exit status: 0 done (also when images were quarantined), 1 the run failed, 2 bad usage or
configuration (one line on stderr, no traceback). With --json the last line of stdout is one JSON
object with the run's counts, metrics, ids and paths.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer

from leukoflow.errors import LeukoflowError

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
AsJson = Annotated[bool, typer.Option("--json", help="End stdout with one JSON summary line")]

DEFAULT_BACKBONES = "vgg16,densenet121,inception_resnet_v2"


def _quiet_environment() -> None:
    """No telemetry, no TensorFlow chatter; set before Prefect or TensorFlow is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


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
) -> dict:
    from tasks import backbones as bb
    from tasks import train

    names = bb.parse_backbones(backbones)  # fail fast, before any engine starts
    bb.check_image_size(names, image_size)
    train.make_classifier(classifier)
    train.check_split(split)
    choice = bb.parse_weights(weights, weights_dir, seed)
    for name in names:
        bb.weights_id(bb.BACKBONES[name], choice)
    label_map = _parse_labels(labels)

    from flows.run import run_pipeline

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
    )


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
    as_json: AsJson = False,
) -> None:
    """Catalog -> extract -> join -> train -> evaluate -> report on a collection of images."""
    summary = _run(
        images, store, dataset, backbones, weights, weights_dir, image_size, classifier,
        split, seed, ray_address, labels, batch_size,
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
    from tasks.synthetic import make_synthetic_dataset

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
    from tasks.storage import open_location

    report = store_status(open_location(store))
    if as_json:
        print(json.dumps(report, default=str))
    else:
        render_status(report)


class _UserErrorFilter(logging.Filter):
    """Prefect logs a failed task's traceback; a user error needs only its one-line message."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if _user_error(error) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


def _hide_tracebacks_of_user_errors() -> None:
    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _UserErrorFilter) for f in handler.filters):
                handler.addFilter(_UserErrorFilter())


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
        print(f"leukoflow: error: {str(user_error).splitlines()[0]}", file=sys.stderr)
        return 2
    if os.environ.get("LEUKOFLOW_DEBUG"):
        traceback.print_exception(error)
    else:
        logging.getLogger("leukoflow").debug("run failed", exc_info=error)
    print(
        f"leukoflow: run failed: {type(error).__name__}: {error} (LEUKOFLOW_DEBUG=1 for details)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    main()
