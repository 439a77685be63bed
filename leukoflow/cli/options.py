"""Options shared by several commands, each defined once.

Single options are `Annotated` aliases (`Store`, `AsJson`, ...). Options that together make one
value are an `OptionGroup`: the recipe options build a `FeatureRecipe`, the compute options a
`Compute`. A command asks for the value, not the options:

    @shared_options
    def run(images: ImagesList, recipe: FeatureRecipe = RECIPE, compute: Compute = COMPUTE): ...

and `shared_options` puts the group's options in the command's signature (where Typer reads
them) and hands the command the built value. Importing this module stays cheap (no sklearn,
no Prefect): `leukoflow --help` must not wait for them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer

from leukoflow import choices
from leukoflow import recipe as rc
from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb
from leukoflow.recipe import PRECISION_CHOICES, Compute, FeatureRecipe
from leukoflow.vocabulary import Label

DEFAULT_BACKBONES = ",".join(bb.DEFAULT_BACKBONES)
PAPER_BACKBONES = ",".join(choices.PAPER_BACKBONES)
PAPER_CLASSIFIERS = ",".join(choices.PAPER_CLASSIFIERS)

# -- single options --------------------------------------------------------------------------
Store = Annotated[str, typer.Option("--store", help="Store root: a folder or s3://bucket/prefix")]
AsJson = Annotated[bool, typer.Option("--json", help="End stdout with one JSON summary line")]
Dataset = Annotated[str, typer.Option("--dataset", help="Dataset name recorded in the catalog")]
ImagesList = Annotated[
    list[str], typer.Argument(help="Folders (C-NMC or class folders) or CSV manifests")
]
Labels = Annotated[
    str | None,
    typer.Option(
        help="Folder-to-label mapping, e.g. blast=all,normal=hem (default all=all,hem=hem)"
    ),
]
ModelId = Annotated[str, typer.Option("--model", help="Model id, or current")]
WeightsDir = Annotated[
    str | None, typer.Option("--weights-dir", help="Folder with the Keras notop .h5 files")
]
Precision = Annotated[
    Literal[PRECISION_CHOICES] | None,
    typer.Option(
        help="Numeric precision of the CNNs: fp32, bf16 (used only with its parity to fp32 "
        "measured) or auto (what this machine runs natively); score: default the model's own"
    ),
]
Classifier = Annotated[
    Literal[choices.CLASSIFIERS],
    typer.Option(help=f"Classifier ({choices.DEFAULT_CLASSIFIER} is the paper's)"),
]
Split = Annotated[
    Literal[choices.SPLITS] | None,
    typer.Option(
        help="random (the paper's 90/10) or subject (each patient on one side: honest) "
        "[default: subject when every image carries a subject id, else random]",
        show_default=False,
    ),
]
ExperimentSplit = Annotated[
    Literal[choices.EXPERIMENT_SPLITS],
    typer.Option(help="random (the paper's 90/10), subject (grouped k-fold) or both"),
]
NBoot = Annotated[int, typer.Option("--n-boot", help="Subject bootstrap resamples")]


def parse_labels(text: str | None) -> dict[str, str] | None:
    """`blast=all,normal=hem` as a folder -> label mapping (None: the default folders)."""
    if not text:
        return None
    mapping = {}
    for pair in text.split(","):
        folder, sep, label = pair.partition("=")
        if not sep or label.strip() not in tuple(Label):
            raise LeukoflowError(f"--labels wants folder={'|'.join(Label)} pairs; got {pair!r}")
        mapping[folder.strip()] = label.strip()
    return mapping


def check_store(store: str) -> None:
    """An unreachable or missing store is a configuration error: say so before any work."""
    from leukoflow.store.storage import check_store as check
    from leukoflow.store.storage import open_location

    check(open_location(store))


def check_images(images: str | list[str]) -> None:
    """A missing folder or manifest is the user's error: said in a second, before any engine."""
    from leukoflow.features.catalog import check_sources

    check_sources(images)


# -- option groups ---------------------------------------------------------------------------
class OptionGroup:
    """Options that build one value: `build`'s parameters are the options (with their help),
    its result is what the command receives. `defaults` override the build's defaults for one
    command (the demo runs with --weights none, experiments with the paper's six backbones)."""

    def __init__(self, build: Callable[..., Any], **defaults: Any) -> None:
        self.build = build
        signature = inspect.signature(build, eval_str=True)
        unknown = set(defaults) - set(signature.parameters)
        if unknown:
            raise TypeError(f"{build.__name__} has no option {', '.join(sorted(unknown))}")
        self.parameters = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=defaults.get(p.name, p.default))
            for p in signature.parameters.values()
        ]

    def with_defaults(self, **defaults: Any) -> OptionGroup:
        return OptionGroup(self.build, **({p.name: p.default for p in self.parameters} | defaults))


def shared_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with each parameter whose default is an OptionGroup replaced by the group's
    options; on invocation the group's value is built from them and passed under that name."""
    signature = inspect.signature(command, eval_str=True)
    groups = {p.name: p.default for p in signature.parameters.values()
              if isinstance(p.default, OptionGroup)}  # fmt: skip
    parameters: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        # Keyword-only: click passes values by name, and groups may sit between defaults.
        added = groups[p.name].parameters if p.name in groups else [p]
        parameters += [q.replace(kind=inspect.Parameter.KEYWORD_ONLY) for q in added]
    names = [p.name for p in parameters]
    if len(names) != len(set(names)):
        raise TypeError(f"{command.__name__}: two options share a name in {names}")

    @functools.wraps(command)
    def invoke(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group.build(**{p.name: values.pop(p.name) for p in group.parameters})
        return command(**values)

    invoke.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    invoke.__annotations__ = {p.name: p.annotation for p in parameters}
    return invoke


def _feature_recipe(
    backbones: Annotated[
        str,
        typer.Option(help=f"Comma list, in concatenation order ({', '.join(bb.BACKBONES)})"),
    ] = DEFAULT_BACKBONES,
    weights: Annotated[
        str, typer.Option(help="imagenet, none (random init: non-clinical) or DIR")
    ] = rc.DEFAULT_WEIGHTS,
    weights_dir: WeightsDir = None,
    image_size: Annotated[
        int, typer.Option("--image-size", help="Square input size in pixels")
    ] = rc.DEFAULT_IMAGE_SIZE,
    seed: Annotated[
        int, typer.Option(help="Seed for splits, random init and classifiers")
    ] = choices.DEFAULT_SEED,
    precision: Precision = rc.DEFAULT_PRECISION,
) -> FeatureRecipe:
    """The feature recipe, checked whole before any engine starts (names, sizes, weights)."""
    recipe = FeatureRecipe(
        tuple(bb.parse_backbones(backbones)), weights, image_size, seed,
        precision or rc.DEFAULT_PRECISION, weights_dir,
    )  # fmt: skip
    recipe.weights_ids  # noqa: B018 - finds and MD5-checks the weights files now, in one line
    return recipe


def _compute(
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="An existing Ray cluster (default: $RAY_ADDRESS or local)"
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per extraction batch")
    ] = rc.DEFAULT_BATCH_SIZE,
    gpu_share: Annotated[
        float | None,
        typer.Option(
            "--gpu-share",
            help="GPUs per backbone actor where the cluster has GPUs, "
            "e.g. 0.33 puts three backbones on one card (default: 1 / backbones)",
        ),
    ] = None,
    actor_cpus: Annotated[
        float | None,
        typer.Option(
            "--actor-cpus",
            help="CPUs per backbone actor (default: on CPU-only "
            "clusters, the smallest node's cores shared between the actors; 1 beside "
            "a GPU)",
        ),
    ] = None,
    batch_timeout: Annotated[
        float | None,
        typer.Option(
            "--batch-timeout",
            help="Seconds to wait for one batch's vectors before the run fails (default: no limit)",
        ),
    ] = None,
) -> Compute:
    """Where the backbone actors run and how wide (validated here, before any engine starts)."""
    return Compute(ray_address, batch_size, gpu_share, actor_cpus, batch_timeout)  # fmt: skip


RECIPE = OptionGroup(_feature_recipe)
COMPUTE = OptionGroup(_compute)
