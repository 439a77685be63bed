"""The store's file format for fitted models: skops bytes, never pickle.

Loading refuses any type outside TRUSTED_TYPES, so a tampered model file fails to load instead of
running unknown code. Owned by the store (store/registry.py writes and reads model.skops); the
learning code only fits the pipelines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import skops.io as sio

from leukoflow.errors import LeukoflowError

if TYPE_CHECKING:  # scikit-learn costs seconds to import; the types are only annotations here
    from sklearn.pipeline import Pipeline

# Types beyond skops' defaults that our pipelines legitimately contain. Anything else in a model
# file (a tampered one, say) makes loading fail instead of executing unknown code.
TRUSTED_TYPES = [
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.tree._tree.Tree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.isotonic.IsotonicRegression",
]


def model_to_bytes(model: Pipeline) -> bytes:
    return sio.dumps(model)


def model_from_bytes(data: bytes) -> Pipeline:
    """Load a skops model file, refusing any type outside the trusted list."""
    untrusted = [t for t in sio.get_untrusted_types(data=data) if t not in TRUSTED_TYPES]
    if untrusted:
        raise LeukoflowError(f"model file refused: it contains untrusted types {untrusted}")
    return sio.loads(data, trusted=TRUSTED_TYPES)
