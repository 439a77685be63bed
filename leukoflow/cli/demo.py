"""`leukoflow demo`: a small synthetic dataset through the whole pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leukoflow import choices
from leukoflow.cli.options import COMPUTE, RECIPE, AsJson, Classifier, Split, shared_options
from leukoflow.cli.training import print_run_summary, train_model
from leukoflow.recipe import Compute, FeatureRecipe


@shared_options
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the synthetic images and the store")] = Path(
        "demo-output"
    ),
    subjects: Annotated[int, typer.Option(help="Synthetic subjects (half ALL)")] = 8,
    cells_per_subject: Annotated[int, typer.Option("--cells-per-subject")] = 12,
    recipe: FeatureRecipe = RECIPE.with_defaults(weights="none"),
    classifier: Classifier = choices.DEFAULT_CLASSIFIER,
    split: Split = None,
    compute: Compute = COMPUTE,
    as_json: AsJson = False,
) -> None:
    """Make a small synthetic C-NMC-like dataset and run the whole pipeline on it."""
    from leukoflow.features.synthetic import make_synthetic_dataset

    images = make_synthetic_dataset(
        out / "images", n_subjects=subjects, cells_per_subject=cells_per_subject, seed=recipe.seed
    )
    summary = train_model(
        str(images), str(out / "store"), recipe, compute, "synthetic-demo", classifier, split
    )
    print_run_summary(summary, as_json)
