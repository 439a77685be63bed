"""Explanations of single cells: class activation maps per CNN backbone, the segmentation and
the features that moved the score for `color_morphology`, rendered as one PNG.

The maps are exact for the saved linear model (present/cam): each backbone's last feature map (the
input of its GAP layer), from the weights and precision recorded with the model, weighted by the
model's weights. The maps come from the run's backbone actors, which already hold the networks
(engine/actors.BackbonePool), or from networks built once per process (LocalFeatureMaps).
Where the store holds the cell's features, the recomputed ones are checked against them, so a
map never claims to explain features the model did not see. Figures are matplotlib `Figure`
objects (never pyplot), so rendering touches no global state.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib
import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.features import augment
from leukoflow.features import backbones as bb
from leukoflow.features.images import ImageRejected, decode_image, resize_pixels
from leukoflow.features.join import concatenate
from leukoflow.learn import train
from leukoflow.present import cam
from leukoflow.store import registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import Location, open_location, write_bytes_atomic
from leukoflow.store.tables import read_catalog_rows, read_features
from leukoflow.vocabulary import NON_CLINICAL_NOTICE, Label, flagged

TOP_FEATURES = 8
# Recomputed features may differ from stored ones by float round-off (another machine, a GPU);
# different weights or feature code differ by orders of magnitude more.
FEATURE_TOLERANCE = 1e-2
NON_CLINICAL_BANNER = NON_CLINICAL_NOTICE
EXAMPLE_KINDS = ("TP", "FP", "FN")
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}(#.+)?$")


@dataclass
class CellExplanation:
    """What one cell's PNG shows: the cell, each CNN's map and each block's part of the score."""

    image_id: str
    model_id: str
    pixels: np.ndarray  # full-resolution RGB uint8
    score: float  # the saved model's own score
    score_kind: str  # "decision_value" or "probability"
    threshold: float
    decision: float  # the linear decision; the contributions sum to it
    contributions: dict[str, float]  # backbone -> its part of the decision
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # CNN backbone -> (h, w) CAM
    segmentation: object | None = None  # color_morphology.Segmentation, when in the recipe
    top_features: list[dict] = field(default_factory=list)  # color_morphology, by |contribution|
    non_clinical: bool = False

    @property
    def predicted_label(self) -> str:
        return Label.of(flagged(self.score, self.threshold)).value

    def to_dict(self) -> dict:
        """JSON-ready facts of the explanation (no pixels)."""
        return {
            "image_id": self.image_id,
            "model_id": self.model_id,
            "score": self.score,
            "score_kind": self.score_kind,
            "threshold": self.threshold,
            "predicted_label": self.predicted_label,
            "linear_decision": self.decision,
            "contributions": self.contributions,
            "map_shapes": {name: list(m.shape) for name, m in self.maps.items()},
            "top_features": self.top_features,
            "non_clinical": self.non_clinical,
        }


# -- the model's feature extractors ----------------------------------------------------------
def weights_for(
    spec: bb.BackboneSpec, recorded_id: str, weights_dir: str | None
) -> bb.WeightsChoice:
    """The weights that produced features with `recorded_id`, or a clear error if unavailable.

    A precision suffix (`+bf16`) names how the same weights were run, not other weights.
    """
    if spec.full_resolution:
        current = bb.weights_id(spec, bb.WeightsChoice("none"))
        if current != recorded_id:
            raise LeukoflowError(
                f"the model used {spec.name} features {recorded_id}, this code computes {current}"
            )
        return bb.WeightsChoice("none")
    recorded_weights = recorded_id.partition("+")[0]
    seed = re.fullmatch(r"random-seed(-?\d+)", recorded_weights)
    if seed:
        return bb.WeightsChoice("none", seed=int(seed.group(1)))
    if recorded_weights.startswith("imagenet-"):
        choice = bb.WeightsChoice("imagenet", folder=weights_dir)
        found = bb.weights_id(spec, choice)  # checks the file and its MD5
        if found != recorded_weights:
            raise LeukoflowError(
                f"the model used {spec.name} weights {recorded_weights}, but the weights file "
                f"found is {found}; pass --weights-dir with the file the model was trained with"
            )
        return choice
    raise LeukoflowError(f"unknown weights id {recorded_id!r} for {spec.name} in the model record")


class FeatureMapSource(Protocol):
    """Something holding the CNNs that gives their last feature maps: the run's backbone actors
    (engine/actors.BackbonePool) or, in a process of its own, LocalFeatureMaps."""

    def feature_maps(self, names: list[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
        """name -> (N, h, w, C) maps of resized pixels (N, S, S, 3) in 0..255."""
        ...


@functools.lru_cache(maxsize=8)
def _cached_featuriser(name: str, image_size: int, choice: bb.WeightsChoice, precision: str):
    from leukoflow.features.extract import Featuriser  # loads Keras: only when explaining

    return Featuriser(bb.BACKBONES[name], image_size, choice, precision)


class LocalFeatureMaps:
    """The CNNs built in this process, once per process (cached): for `leukoflow explain` and
    other single-process callers. A flow that has backbone actors passes those instead."""

    def __init__(self, image_size: int, choices: dict[str, bb.WeightsChoice], precision: str):
        self.image_size = image_size
        self.choices = choices
        self.precision = precision

    def feature_maps(self, names: list[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {
            name: _cached_featuriser(
                name, self.image_size, self.choices[name], self.precision
            ).feature_maps(pixels)
            for name in names
        }


class Explainer:
    """A saved model and the source of its backbones' feature maps."""

    def __init__(
        self,
        model,
        record: ModelRecord,
        weights_dir: str | None = None,
        top_k: int = TOP_FEATURES,
        maps: FeatureMapSource | None = None,
    ):
        self.model = model
        self.record = record
        self.recipe = record.feature_recipe
        self.linear = cam.linear_model(model, self.recipe)
        self.top_k = top_k
        size = int(self.recipe["image_size"])
        precision = str(self.recipe.get("precision", "fp32"))
        choices = {
            name: weights_for(bb.BACKBONES[name], self.recipe["weights_ids"][name], weights_dir)
            for name in self.recipe["backbones"]
        }
        self._cnns = [n for n in self.recipe["backbones"] if not bb.BACKBONES[n].full_resolution]
        if maps is not None:
            _check_same_recipe(maps, self.recipe, self._cnns)
        self._maps = maps or LocalFeatureMaps(size, choices, precision)

    @classmethod
    def from_store(
        cls,
        store: Location,
        model: str = "current",
        weights_dir: str | None = None,
        maps: FeatureMapSource | None = None,
    ) -> Explainer:
        model_id = registry.resolve_model_id(store, model)
        fitted, record = registry.load_model(store, model_id)
        return cls(fitted, record, weights_dir, maps=maps)

    def feature_maps(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Each CNN's last feature map (h, w, C) for one full-resolution RGB uint8 cell."""
        if not self._cnns:
            return {}
        batch = resize_pixels(pixels, int(self.recipe["image_size"]))[None]
        maps = self._maps.feature_maps(self._cnns, batch)
        return {name: np.asarray(maps[name], np.float64)[0] for name in self._cnns}

    def explain(
        self, image_id: str, pixels: np.ndarray, stored: np.ndarray | None = None
    ) -> CellExplanation:
        """Maps and contributions of one cell; `stored`: its joined vector from the store."""
        maps = self.feature_maps(pixels)
        x = self._joined_vector(pixels, maps)
        if stored is not None:
            self._check_against_stored(x, np.asarray(stored, np.float64))
        scores, score_kind = train.decision_scores(self.model, x[None].astype(np.float32))
        explanation = CellExplanation(
            image_id=image_id,
            model_id=self.record.model_id,
            pixels=pixels,
            score=float(scores[0]),
            score_kind=score_kind,
            threshold=float(self.record.threshold or 0.0),
            decision=self.linear.decision(x),
            contributions=cam.block_contributions(self.linear, x),
            maps={
                name: cam.class_activation_map(
                    fmap, self.linear.block_weights(name), self.linear.block_offset(name)
                )
                for name, fmap in maps.items()
            },
            non_clinical=bool(self.record.non_clinical),
        )
        for block in self.linear.blocks:
            if block.backbone not in maps:  # the hand-crafted block (color_morphology)
                module = _handcrafted_module(block.backbone)
                explanation.segmentation = module.segment_cell(pixels)
                explanation.top_features = cam.top_features(
                    module.FEATURE_NAMES,
                    x[block.columns],
                    cam.feature_contributions(self.linear, block.backbone, x),
                    self.top_k,
                )
        return explanation

    def _joined_vector(self, pixels: np.ndarray, maps: dict[str, np.ndarray]) -> np.ndarray:
        """The raw joined feature vector, recomputed: GAP of each map, hand-crafted features."""
        blocks = []
        for block in self.linear.blocks:
            if block.backbone in maps:
                blocks.append(maps[block.backbone].mean(axis=(0, 1)))
            else:
                features = _handcrafted_module(block.backbone).extract_features(pixels)
                blocks.append(np.asarray(features, np.float64))
        return np.concatenate(blocks)

    def _check_against_stored(self, recomputed: np.ndarray, stored: np.ndarray) -> None:
        for block in self.linear.blocks:
            new, old = recomputed[block.columns], stored[block.columns]
            gap = np.linalg.norm(new - old) / max(np.linalg.norm(old), 1e-12)
            if gap > FEATURE_TOLERANCE:
                raise LeukoflowError(
                    f"recomputed {block.backbone} features differ from the stored ones by "
                    f"{gap:.1%}: the weights or the feature code changed since this model was "
                    "trained, so its map would not explain the model"
                )


def _check_same_recipe(maps: FeatureMapSource, recipe: dict, cnns: list[str]) -> None:
    """Backbone actors of another recipe (weights, size, precision) would explain features the
    model never saw: refuse them in one line."""
    theirs = getattr(maps, "recipe", None)
    if theirs is None:
        return
    for name in cnns:
        key = (recipe["weights_ids"][name], int(recipe["image_size"]))
        if name not in theirs.backbones or theirs.vector_key(name) != key:
            raise LeukoflowError(
                f"the running {name} actor computes other features than the model's "
                f"({theirs.vector_key(name) if name in theirs.backbones else 'none'} vs {key})"
            )


def _handcrafted_module(name: str):
    return importlib.import_module(bb.BACKBONES[name].module)


# -- rendering -------------------------------------------------------------------------------
HEADER_INCHES = 1.0


def render_explanation(explanation: CellExplanation) -> Figure:
    """The cell, a heatmap overlay per CNN, the segmentation and the top features, one Figure."""
    e = explanation
    panels = 1 + len(e.maps) + (e.segmentation is not None)
    body_inches = 3.4 + (3.0 if e.top_features else 0.0)
    size = (max(3.3 * panels, 7.5), HEADER_INCHES + body_inches)
    fig = Figure(figsize=size, layout="constrained")
    header, body = fig.subfigures(2, 1, height_ratios=[HEADER_INCHES, body_inches])
    if e.non_clinical:
        header.text(0.5, 0.97, NON_CLINICAL_BANNER, ha="center", va="top", color="#c81e1e",
                    fontsize=10, fontweight="bold")  # fmt: skip
    header.text(0.5, 0.05, _headline(e), ha="center", va="bottom", fontsize=9.5)
    _render_body(body, e, panels)
    return fig


def _render_body(body, e: CellExplanation, panels: int) -> None:
    rows = 2 if e.top_features else 1
    grid = body.add_gridspec(rows, panels, height_ratios=[1.15, 1][:rows])
    _show_cell(body.add_subplot(grid[0, 0]), e.pixels, f"cell {e.image_id[:12]}")
    for k, (name, heat) in enumerate(e.maps.items(), start=1):
        ax = body.add_subplot(grid[0, k])
        _plot_map(body, ax, e.pixels, name, heat, e.contributions[name])
    if e.segmentation is not None:
        _plot_segmentation(body.add_subplot(grid[0, panels - 1]), e)
    if e.top_features:
        _plot_top_features(body.add_subplot(grid[1, :]), e.top_features)


def _headline(e: CellExplanation) -> str:
    verdict = "ALL (blast)" if e.predicted_label == Label.ALL else "hem (normal)"
    parts = " + ".join(f"{name} {value:+.3f}" for name, value in e.contributions.items())
    return (
        f"model {e.model_id}: {verdict}, {e.score_kind} {e.score:.3f} (threshold "
        f"{e.threshold:g})\nlinear decision {e.decision:+.3f} = {parts}\n"
        "red: towards ALL, blue: towards normal, relative to the average training cell"
    )


def _show_cell(ax, pixels: np.ndarray, title: str) -> None:
    ax.imshow(pixels)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _plot_map(fig, ax, pixels: np.ndarray, name: str, heat: np.ndarray, part: float):
    height, width = pixels.shape[:2]
    overlay = cam.upsample_map(heat, height, width)
    limit = max(float(np.abs(overlay).max()), 1e-12)
    _show_cell(ax, pixels, f"{name}: {part:+.3f}\n({heat.shape[0]}x{heat.shape[1]} map)")
    image = ax.imshow(overlay, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.55)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _plot_segmentation(ax, e: CellExplanation) -> None:
    name = next(n for n in e.contributions if bb.BACKBONES[n].full_resolution)
    _show_cell(
        ax, e.pixels, f"{name}: {e.contributions[name]:+.3f}\ncell (cyan), nucleus (magenta)"
    )
    for mask, colour in ((e.segmentation.cell_mask, "cyan"), (e.segmentation.nucleus_mask, "m")):
        if mask.any():  # contour() of an empty mask only warns
            ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)


def _plot_top_features(ax, features: list[dict]) -> None:
    shown = features[::-1]  # largest at the top
    values = [f["contribution"] for f in shown]
    colours = ["#c81e1e" if v > 0 else "#1f4e9c" for v in values]
    ax.barh(range(len(shown)), values, color=colours)
    ax.set_yticks(range(len(shown)), labels=[f"{f['name']} = {f['value']:.4g}" for f in shown])
    ax.axvline(0, color="#444444", linewidth=0.8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("weight x standardised value (part of the decision)")
    ax.set_title("color_morphology: features that moved the score most", fontsize=9)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a Figure, through an explicit Agg canvas (no global backend)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# -- cells from files, the catalog and the store ---------------------------------------------
def read_cell(uri: str, image_id: str | None = None) -> tuple[str, np.ndarray]:
    """(image id, RGB pixels) of an image file; an id "<sha256>#<transform>" applies it."""
    source_id, transform = augment.parse_image_id(image_id) if image_id else (None, None)
    loc = open_location(uri)
    try:
        data = loc.fs.cat_file(loc.path)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise LeukoflowError(f"image {uri} not found") from error
    digest = hashlib.sha256(data).hexdigest()
    if source_id is not None and digest != source_id:
        raise LeukoflowError(f"image {uri} changed since it was catalogued (sha256 differs)")
    try:
        pixels = decode_image(data).pixels
    except ImageRejected as error:
        raise LeukoflowError(f"image {uri} cannot be explained: {error}") from error
    if transform is not None:
        pixels = augment.apply_transform(pixels, transform)
    return image_id or digest, pixels


def catalog_uris(store: Location, image_ids: list[str]) -> dict[str, str]:
    """The file of each image id (augmented ids resolve to their source file)."""
    catalog = read_catalog_rows(store)
    uris = {r.image_id: r.uri for r in catalog if r.ok}
    found, unknown = {}, []
    for image_id in image_ids:
        source_id, _ = augment.parse_image_id(image_id)
        if source_id in uris:
            found[image_id] = uris[source_id]
        else:
            unknown.append(image_id)
    if unknown:
        raise LeukoflowError(f"image id(s) not in the catalog of {store.uri}: {unknown[:3]}")
    return found


def stored_vector(store: Location, recipe: dict, image_id: str) -> np.ndarray | None:
    """The joined vector the store holds for the image under a model's recorded recipe, if
    complete (read by the recorded keys: no weights file is needed to look vectors up)."""
    names = list(recipe["backbones"])
    vectors = {
        name: read_features(
            store,
            name,
            recipe["weights_ids"][name],
            bb.size_key(bb.BACKBONES[name], int(recipe["image_size"])),
            [image_id],
        )  # fmt: skip
        for name in names
    }
    joined = concatenate([image_id], vectors, names)
    return joined.matrix[0] if joined.image_ids else None


def explanations_folder(store: Location, night: str) -> Location:
    """Where the nightly sweep's PNGs go: explanations/date=YYYY-MM-DD/ under the store."""
    return store.child("explanations", f"date={night}")


def explanation_name(image_id: str) -> str:
    return f"{image_id.replace(augment.SEPARATOR, '_')}.png"


def explain_images(
    store: str | Location,
    model_id: str,
    image_ids: list[str],
    out_folder: str,
    weights_dir: str | None = None,
    maps: FeatureMapSource | None = None,
) -> list[str]:
    """One PNG per catalogued image id under `out_folder` (local or s3://); returns their uris.

    `maps`: the running backbone actors (engine/actors.BackbonePool); without, the CNNs are built
    once in this process.
    """
    root = open_location(store) if isinstance(store, str) else store
    if not image_ids:
        return []
    explainer = Explainer.from_store(root, model_id, weights_dir, maps=maps)
    uris = catalog_uris(root, image_ids)
    folder = open_location(out_folder)
    written = []
    for image_id in image_ids:
        _, pixels = read_cell(uris[image_id], image_id)
        stored = stored_vector(root, explainer.recipe, image_id)
        png = figure_png(render_explanation(explainer.explain(image_id, pixels, stored)))
        target = folder.child(explanation_name(image_id))
        write_bytes_atomic(target, png)
        written.append(target.uri)
    return written


def explain_image(
    store: str,
    image: str,
    model: str = "current",
    out: str | None = None,
    weights_dir: str | None = None,
) -> dict:
    """`leukoflow explain`: IMAGE is a file (local or s3://) or a catalogued image id."""
    root = open_location(store)
    fitted, record = registry.load_model(root, registry.resolve_model_id(root, model))
    image_id, pixels, stem = _read_image_argument(root, image)  # fail before Keras loads
    explainer = Explainer(fitted, record, weights_dir)
    stored = stored_vector(root, explainer.recipe, image_id)
    explanation = explainer.explain(image_id, pixels, stored)
    target = open_location(out or f"{stem}-explained.png")
    write_bytes_atomic(target, figure_png(render_explanation(explanation)))
    return {**explanation.to_dict(), "png": target.uri}


def _read_image_argument(store: Location, image: str) -> tuple[str, np.ndarray, str]:
    """(image id, pixels, a name for the PNG) of a file path/URI or a catalogued image id."""
    as_file = open_location(image)
    if _IMAGE_ID.match(image) and not as_file.fs.exists(as_file.path):
        image_id, pixels = read_cell(catalog_uris(store, [image])[image], image)
        return image_id, pixels, image_id[:12]
    image_id, pixels = read_cell(image)
    return image_id, pixels, posixpath.splitext(posixpath.basename(image.rstrip("/")))[0]


# -- report examples -------------------------------------------------------------------------
def pick_examples(
    image_ids: list[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray,
    per_kind: int = choices.REPORT_EXAMPLES_PER_KIND,
) -> list[tuple[str, str]]:
    """(kind, image id) of the most confident true positives, false positives and false negatives
    of a test set: the cases a reader learns most from, `per_kind` of each at most."""
    y_true, y_pred, scores = np.asarray(y_true), np.asarray(y_pred), np.asarray(scores)
    wanted = {
        "TP": ((y_true == 1) & (y_pred == 1), -scores),  # most ALL-like first
        "FP": ((y_true == 0) & (y_pred == 1), -scores),
        "FN": ((y_true == 1) & (y_pred == 0), scores),  # most confidently missed first
    }
    picked = []
    for kind in EXAMPLE_KINDS:
        members, order_key = wanted[kind]
        rows = np.flatnonzero(members)
        rows = rows[np.argsort(order_key[rows], kind="stable")][:per_kind]
        picked += [(kind, image_ids[i]) for i in rows]
    return picked


def example_gallery(
    explainer: Explainer,
    cases: list[tuple[str, str]],
    uris: dict[str, str],
    vectors: dict[str, np.ndarray],
) -> list[dict]:
    """The report's examples: {"kind", "image_id", "png_data_uri"} for each (kind, image id)."""
    gallery = []
    for kind, image_id in cases:
        _, pixels = read_cell(uris[image_id], image_id)
        explanation = explainer.explain(image_id, pixels, vectors.get(image_id))
        png = figure_png(render_explanation(explanation), dpi=60)
        gallery.append({"kind": kind, "image_id": image_id, "png_data_uri": png_data_uri(png)})
    return gallery
