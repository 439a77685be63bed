"""`leukoflow run`, `validate` and `experiments`: train and measure on catalogued collections."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from leukoflow import choices
from leukoflow.cli.boundary import before_flow
from leukoflow.cli.options import (
    COMPUTE,
    PAPER_BACKBONES,
    PAPER_CLASSIFIERS,
    RECIPE,
    AsJson,
    Classifier,
    Dataset,
    ExperimentSplit,
    ImagesList,
    Labels,
    NBoot,
    Split,
    Store,
    check_images,
    check_store,
    parse_labels,
    shared_options,
)
from leukoflow.cli.output import console, print_json
from leukoflow.recipe import Compute, FeatureRecipe

METRICS_SHOWN = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc")

TargetSensitivity = Annotated[
    float,
    typer.Option(
        "--target-sensitivity",
        help="Sensitivity for ALL the screening threshold must reach on validation folds",
    ),
]


def train_model(
    images: str | list[str],
    store: str,
    recipe: FeatureRecipe,
    compute: Compute,
    dataset: str,
    classifier: str,
    split: str | None,
    labels: str | None = None,
    target_sensitivity: float = choices.DEFAULT_TARGET_SENSITIVITY,
    promote: bool = True,
    force: bool = False,
) -> dict:
    """The run flow, once everything a user can get wrong is checked (shared with `demo`)."""
    from leukoflow.learn import calibration

    calibration.check_target_sensitivity(target_sensitivity)
    label_map = parse_labels(labels)
    check_store(store)
    check_images(images)

    from leukoflow.flows.run import run_pipeline

    before_flow()
    return run_pipeline(
        images=images, store=store, recipe=recipe, compute=compute, dataset=dataset,
        classifier=classifier, split=split, seed=recipe.seed, labels=label_map,
        target_sensitivity=target_sensitivity, promote=promote, force=force,
    )  # fmt: skip


@shared_options
def run(
    images: ImagesList,
    store: Store,
    dataset: Dataset = "default",
    recipe: FeatureRecipe = RECIPE,
    classifier: Classifier = choices.DEFAULT_CLASSIFIER,
    split: Split = None,
    labels: Labels = None,
    target_sensitivity: TargetSensitivity = choices.DEFAULT_TARGET_SENSITIVITY,
    promote: Annotated[
        bool,
        typer.Option(
            help="Make the new model current (a non-clinical model never replaces "
            "a clinical one without --force)"
        ),
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Promote even over a clinical current model")
    ] = False,
    compute: Compute = COMPUTE,
    as_json: AsJson = False,
) -> None:
    """Catalog -> extract -> join -> train -> evaluate -> report on one collection of images
    (several folders or manifests make one collection)."""
    summary = train_model(
        images, store, recipe, compute, dataset, classifier, split, labels,
        target_sensitivity, promote, force,
    )  # fmt: skip
    print_run_summary(summary, as_json)


def print_run_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    out = console()
    if summary.get("note"):
        out.print(f"[bold red]{summary['note']}[/]")
    counts = summary["counts"]
    out.print(
        f"[bold]leukoflow run {summary['run_id']}[/] on dataset [cyan]{summary['dataset']}[/]: "
        f"{counts['found']} images found, {counts['featurised']} featurised, "
        f"{counts['quarantined']} quarantined, {counts['duplicate']} duplicates"
        + (f", [bold red]{counts['missing']} missing[/]" if counts.get("missing") else "")
    )
    extraction = summary["extraction"]
    computed = extraction["computed"] or "none (all features were already in the store)"
    out.print(f"features: {' + '.join(summary['backbones'])} = {summary['feature_dim']} "
              f"per image; computed now: {computed}")  # fmt: skip
    if extraction.get("images_per_second"):
        out.print(f"extraction: {extraction['images_per_second']} images/s")
    table = Table(title=f"{summary['classifier']} on a {summary['split']} split "
                        f"({summary['n_train']} train / {summary['n_test']} test)")  # fmt: skip
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in METRICS_SHOWN:
        value = summary["metrics"].get(name)
        table.add_row(name, "n/a" if value is None else f"{value:.4f}")
    out.print(table)
    promoted = summary.get("promoted", True)
    out.print(f"model: {summary['model_id']} ({'current' if promoted else 'not promoted'})")
    out.print(f"report: {summary['paths']['report_html']}")


@shared_options
def validate(
    images: ImagesList,
    store: Store,
    dataset: Dataset = "default",
    recipe: FeatureRecipe = RECIPE,
    classifier: Classifier = choices.DEFAULT_CLASSIFIER,
    folds: Annotated[int, typer.Option(help="Subject-grouped folds")] = choices.DEFAULT_FOLDS,
    n_boot: NBoot = choices.DEFAULT_BOOTSTRAP,
    labels: Labels = None,
    compute: Compute = COMPUTE,
    as_json: AsJson = False,
) -> None:
    """Subject-grouped k-fold metrics of one feature set (the paper's linear SVM by default)."""
    label_map = parse_labels(labels)
    check_store(store)
    check_images(images)
    from leukoflow.flows.validate import run_validation

    before_flow()
    summary = run_validation(
        images=list(images), store=store, recipe=recipe, compute=compute, dataset=dataset,
        classifier=classifier, folds=folds, seed=recipe.seed, n_boot=n_boot, labels=label_map,
    )  # fmt: skip
    if as_json:
        print_json(summary)
        return
    out = console()
    if summary["note"]:
        out.print(summary["note"])
    out.print(
        f"{'+'.join(recipe.backbones)}, {summary['classifier']}: {summary['n_images']} cells, "
        f"{summary['n_subjects']} subjects, {summary['folds']} subject-grouped folds "
        "(mean ± std [95% subject bootstrap])"
    )
    for key, m in summary["metrics"].items():
        out.print(f"  {key:<18} {m['mean']:.4f} ± {m['std']:.4f} [{m['low']:.4f}, {m['high']:.4f}]")
    level = summary["patient_level"]
    out.print(
        f"patients: {level['n_patients']} ({level['n_cells']} cells), held out and pooled over "
        f"the folds; confusion [[TN, FP], [FN, TP]] {level['confusion_matrix']['matrix']}"
    )
    for key, m in level["metrics"].items():
        shown = "n/a" if m["pooled"] is None else f"{m['pooled']:.4f}"
        interval = "" if m["low"] is None else f" [{m['low']:.4f}, {m['high']:.4f}]"
        out.print(f"  {key:<18} {shown}{interval}")


@shared_options
def experiments(
    store: Store,
    images: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders or CSV manifests to catalog first (default: the dataset "
            "as `run` or `backfill` catalogued it)"
        ),
    ] = None,
    dataset: Dataset = "default",
    recipe: FeatureRecipe = RECIPE.with_defaults(backbones=PAPER_BACKBONES),
    classifiers: Annotated[
        str, typer.Option(help=f"Comma list of {', '.join(choices.CLASSIFIERS)}")
    ] = PAPER_CLASSIFIERS,
    split: ExperimentSplit = "both",
    trio: Annotated[
        str | None,
        typer.Option(help="The 3 backbones whose pairs and trio are tried (default: the paper's)"),
    ] = None,
    folds: Annotated[
        int, typer.Option(help="Folds of the subject-grouped evaluation")
    ] = choices.DEFAULT_FOLDS,
    n_boot: NBoot = choices.DEFAULT_BOOTSTRAP,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment", help="Train also on flipped and rotated copies (4x the extraction)"
        ),
    ] = False,
    compute: Compute = COMPUTE,
    as_json: AsJson = False,
) -> None:
    """The paper's grid (backbones, pairs, trio x classifiers) beside subject-grouped numbers."""
    from leukoflow.features import backbones as bb
    from leukoflow.learn import experiments as ex

    classifier_names = ex.parse_classifiers(classifiers)
    trio_names = bb.parse_backbones(trio) if trio else None
    ex.feature_sets(list(recipe.backbones), trio_names)
    if images:
        check_images(images)

    from leukoflow.flows.experiments import run_experiments

    before_flow()
    summary = run_experiments(
        store=store, recipe=recipe, compute=compute, dataset=dataset,
        classifiers=classifier_names, split=split, trio=trio_names, folds=folds,
        augment=augment, seed=recipe.seed, n_boot=n_boot, images=list(images) if images else None,
    )  # fmt: skip
    if as_json:
        print_json(summary)
        return
    print_experiments(summary)


def print_experiments(summary: dict) -> None:
    """One compact table per evaluation (means, ± std over folds); intervals are in the report."""
    from leukoflow.learn import experiments as ex

    out = console()
    if summary.get("note"):
        out.print(f"[bold red]{summary['note']}[/]")
    for evaluation in summary["evaluations"]:
        header, rows, best = ex.display_table(
            ex.results_for(summary["cells"], evaluation["name"]), intervals=False
        )
        table = Table(title=evaluation["label"])
        for i, column in enumerate(header):
            table.add_column(column, justify="right" if i >= 2 else "left")
        for i, row in enumerate(rows):
            table.add_row(*row, style="bold green" if i == best else None)
        out.print(table)
    out.print("best cell in bold green (highest accuracy, then F1); 95% intervals in the report")
    for key, path in summary["paths"].items():
        out.print(f"{key}: {path}")
