"""Class activation maps of a linear classifier on GAP features: exact maths, no gradients.

The saved model is (StandardScaler, linear classifier) on the joined vector x of every backbone,
so its decision is an affine function of the raw features:

    decision(x) = sum_j coef_j * (x_j - mean_j) / scale_j + intercept = w . x + offset.

For a CNN backbone b, x_b is the spatial mean of its last convolutional feature map A, so its
part of the decision, w_b . x_b + offset_b, is the spatial mean of the map
CAM_b(i, j) = sum_c w_c * A_c(i, j) + offset_b. Each backbone's offset share is its own
centring term, -coef_b . mean_b / scale_b, plus an equal share of the intercept; the shares sum
to the model's offset, so a map's zero means "as ALL-like as the average training cell" and the
backbones' contributions add up to the decision. For a hand-crafted block the same contribution
splits over its named features as coef_j times the standardised value (plus the intercept share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.transform import resize
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from leukoflow.errors import LeukoflowError


@dataclass(frozen=True)
class FeatureBlock:
    """One backbone's columns [start, stop) in the joined feature vector."""

    backbone: str
    start: int
    stop: int

    @property
    def columns(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class LinearModel:
    """decision(x) = coef . (x - mean) / scale + intercept on the raw joined features."""

    coef: np.ndarray  # weights on the standardised features, float64
    intercept: float
    mean: np.ndarray  # the scaler's centre (zeros when it does not centre)
    scale: np.ndarray  # the scaler's scale (ones when it does not scale)
    blocks: tuple[FeatureBlock, ...]

    @property
    def weights(self) -> np.ndarray:
        """The effective weight on each raw feature: coef_j / scale_j."""
        return self.coef / self.scale

    @property
    def offset(self) -> float:
        return float(self.intercept - np.sum(self.coef * self.mean / self.scale))

    def block(self, backbone: str) -> FeatureBlock:
        for block in self.blocks:
            if block.backbone == backbone:
                return block
        raise KeyError(backbone)

    def block_weights(self, backbone: str) -> np.ndarray:
        return self.weights[self.block(backbone).columns]

    def block_offset(self, backbone: str) -> float:
        """The block's centring term plus an equal share of the intercept."""
        cols = self.block(backbone).columns
        centring = np.sum(self.coef[cols] * self.mean[cols] / self.scale[cols])
        return float(self.intercept / len(self.blocks) - centring)

    def decision(self, x: np.ndarray) -> float:
        """The linear decision value of one raw joined vector."""
        return float(np.dot(self.weights, np.asarray(x, dtype=np.float64)) + self.offset)

    def standardized(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.scale


def feature_blocks(recipe: dict) -> tuple[FeatureBlock, ...]:
    """The column range of each backbone, from a model record's feature_recipe."""
    blocks, start = [], 0
    for name, dim in zip(recipe["backbones"], recipe["dims"], strict=True):
        blocks.append(FeatureBlock(name, start, start + int(dim)))
        start += int(dim)
    return tuple(blocks)


def linear_model(model: Pipeline, recipe: dict) -> LinearModel:
    """The affine decision of a saved (scaler, linear classifier) pipeline, per feature block.

    A CalibratedClassifierCV contributes the mean of its base estimators' coefficients: the
    linear score its calibrated copies share (their sigmoids are monotone in it).
    """
    steps = list(model.steps) if isinstance(model, Pipeline) else [("clf", model)]
    *transforms, (_, classifier) = steps
    coef, intercept = _linear_coefficients(classifier)
    mean, scale = _scaler_affine([t for _, t in transforms], coef.size)
    blocks = feature_blocks(recipe)
    if blocks[-1].stop != coef.size:
        raise LeukoflowError(
            f"the model has {coef.size} weights but its feature recipe describes "
            f"{blocks[-1].stop} features ({', '.join(recipe['backbones'])})"
        )
    return LinearModel(coef, intercept, mean, scale, blocks)


def _linear_coefficients(classifier) -> tuple[np.ndarray, float]:
    """(coef, intercept) such that a positive decision means class 1 (all)."""
    if hasattr(classifier, "calibrated_classifiers_"):
        pairs = [_linear_coefficients(c.estimator) for c in classifier.calibrated_classifiers_]
        return np.mean([c for c, _ in pairs], axis=0), float(np.mean([b for _, b in pairs]))
    coef = getattr(classifier, "coef_", None)
    if coef is None or np.ndim(coef) != 2 or np.shape(coef)[0] != 1:
        raise LeukoflowError(
            f"class activation maps need a linear two-class model (linear-svm); this model's "
            f"classifier is {type(classifier).__name__}"
        )
    classes = list(getattr(classifier, "classes_", [0, 1]))
    if classes != [0, 1]:
        raise LeukoflowError(f"expected classes [0, 1] (hem, all), found {classes}")
    intercept = float(np.ravel(classifier.intercept_)[0])
    return np.asarray(coef, dtype=np.float64).ravel(), intercept


def _scaler_affine(transforms: list, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale of the (at most one) StandardScaler before the classifier."""
    mean, scale = np.zeros(n_features), np.ones(n_features)
    active = [t for t in transforms if t not in (None, "passthrough")]
    if len(active) > 1 or (active and not isinstance(active[0], StandardScaler)):
        names = ", ".join(type(t).__name__ for t in active)
        raise LeukoflowError(f"class activation maps need at most a StandardScaler; found {names}")
    if active:
        scaler = active[0]
        if scaler.mean_ is not None:
            mean = np.asarray(scaler.mean_, dtype=np.float64)
        if scaler.scale_ is not None:
            scale = np.asarray(scaler.scale_, dtype=np.float64)
    return mean, scale


def class_activation_map(feature_map: np.ndarray, weights: np.ndarray, offset: float) -> np.ndarray:
    """CAM(i, j) = sum_c w_c * A_c(i, j) + offset of one (H, W, C) map; its mean is the block's
    part of the decision."""
    feature_map = np.asarray(feature_map, dtype=np.float64)
    if feature_map.ndim != 3 or feature_map.shape[2] != np.size(weights):
        raise ValueError(
            f"feature map {feature_map.shape} does not match {np.size(weights)} channel weights"
        )
    return (
        np.tensordot(feature_map, np.asarray(weights, dtype=np.float64), axes=([2], [0])) + offset
    )


def feature_contributions(linear: LinearModel, backbone: str, x: np.ndarray) -> np.ndarray:
    """coef_j times the standardised value of each of the block's features (x: the joined
    vector); they sum to the block's contribution less its intercept share."""
    cols = linear.block(backbone).columns
    return linear.coef[cols] * linear.standardized(x)[cols]


def block_contributions(linear: LinearModel, x: np.ndarray) -> dict[str, float]:
    """Each backbone's part of the decision; they sum to linear.decision(x)."""
    x = np.asarray(x, dtype=np.float64)
    return {
        b.backbone: float(np.dot(linear.weights[b.columns], x[b.columns]))
        + linear.block_offset(b.backbone)
        for b in linear.blocks
    }


def top_features(
    names: tuple[str, ...] | list[str], values: np.ndarray, contributions: np.ndarray, k: int
) -> list[dict]:
    """The k features that moved the score most (largest |contribution|), largest first."""
    order = np.argsort(-np.abs(contributions), kind="stable")[:k]
    return [
        {"name": names[i], "value": float(values[i]), "contribution": float(contributions[i])}
        for i in order
    ]


def upsample_map(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a coarse map to the image it covers (the network saw the whole image)."""
    return resize(np.asarray(cam, dtype=np.float64), (height, width), order=1, mode="edge")
