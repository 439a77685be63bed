"""`leukoflow explain`: one cell's class activation maps under a linear model
(docs/explanations.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from leukoflow.cli.options import AsJson, ModelId, Store, WeightsDir
from leukoflow.cli.output import console, print_json
from leukoflow.vocabulary import NON_CLINICAL_NOTICE


def explain(
    image: Annotated[str, typer.Argument(help="An image file (local or s3://) or a catalog id")],
    store: Store,
    model: ModelId = "current",
    out: Annotated[
        str | None, typer.Option(help="PNG to write (default: ./<image name>-explained.png)")
    ] = None,
    weights_dir: WeightsDir = None,
    as_json: AsJson = False,
) -> None:
    """One cell's class activation maps under a linear model, as a PNG.

    The model's own recipe decides backbones, weights and precision; the cell's networks run in
    this process (one image needs no Ray cluster)."""
    from leukoflow.present.explain import explain_image

    result = explain_image(store, image, model=model, out=out, weights_dir=weights_dir)
    if as_json:
        print_json(result)
        return
    shown = console()
    if result["non_clinical"]:
        shown.print(NON_CLINICAL_NOTICE, highlight=False)
    parts = ", ".join(f"{k} {v:+.3f}" for k, v in result["contributions"].items())
    shown.print(
        f"{result['predicted_label']}: {result['score_kind']} {result['score']:.4f} ({parts})",
        highlight=False,
    )
    shown.print(result["png"], highlight=False)
