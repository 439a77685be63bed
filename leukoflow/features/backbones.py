"""The backbone registry: one place that knows each feature extractor.

For every CNN: the Keras constructor, its own preprocessing mode (they differ: caffe, torch, tf),
the GAP feature size, the smallest input it accepts and the standard ImageNet "notop" weights file
with the MD5 Keras publishes for it. Keras and TensorFlow are imported only inside functions, so
importing this module stays cheap (the CLI and the driver never load TensorFlow).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leukoflow.errors import LeukoflowError

log = logging.getLogger("leukoflow.backbones")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    module: str  # keras.applications.<module>, or the tasks module of a hand-crafted extractor
    constructor: str
    preprocess_mode: str  # documentation only: keras' own preprocess_input is what runs
    feature_dim: int
    min_image_size: int
    weights_file: str
    weights_md5: str | None  # None where Keras publishes no hash (MobileNetV2)
    kind: str = "keras"  # "keras": a CNN; "handcrafted": needs no weights, sees full resolution

    @property
    def full_resolution(self) -> bool:
        return self.kind == "handcrafted"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "vgg16", "vgg16", "VGG16", "caffe", 512, 32,
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "6d6bbae143d832006294945121d1f1fc",
        ),
        BackboneSpec(
            "vgg19", "vgg19", "VGG19", "caffe", 512, 32,
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "253f8cb515780f3b799900260a226db6",
        ),
        BackboneSpec(
            "resnet101", "resnet", "ResNet101", "caffe", 2048, 32,
            "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "88cf7a10940856eca736dc7b7e228a21",
        ),
        BackboneSpec(
            "mobilenet_v2", "mobilenet_v2", "MobileNetV2", "tf", 1280, 32,
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            None,
        ),
        BackboneSpec(
            "densenet121", "densenet", "DenseNet121", "torch", 1024, 32,
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "30ee3e1110167f948a6b9946edeeb738",
        ),
        BackboneSpec(
            "inception_resnet_v2", "inception_resnet_v2", "InceptionResNetV2", "tf", 1536, 75,
            "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "d19885ff4a710c122648d3b5c3b684e4",
        ),
        # The paper's proposed future work: colour, morphology and texture of the segmented
        # cell (features/color_morphology.py); versioned by its feature list, not by weights.
        BackboneSpec(
            "color_morphology", "leukoflow.features.color_morphology", "extract_features", "none",
            165, 16, "", None, kind="handcrafted",
        ),
    ]
}  # fmt: skip

# The paper's trio, in the order its 3072-feature vector concatenates them.
DEFAULT_BACKBONES: tuple[str, ...] = ("vgg16", "densenet121", "inception_resnet_v2")


def parse_backbones(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate a comma list of backbone names, keeping the user's order (it fixes the join)."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        raise LeukoflowError(
            f"unknown backbone {', '.join(unknown)}; choose from {', '.join(BACKBONES)}"
        )
    if not names:
        raise LeukoflowError("no backbone given")
    if len(set(names)) != len(names):
        raise LeukoflowError(f"backbone listed twice: {','.join(names)}")
    return names


def size_key(spec: BackboneSpec, image_size: int) -> int:
    """The image size a vector is keyed by: 0 for extractors that see the full resolution."""
    return 0 if spec.full_resolution else image_size


def check_image_size(names: list[str], image_size: int) -> None:
    too_small = [
        n
        for n in names
        if not BACKBONES[n].full_resolution and image_size < BACKBONES[n].min_image_size
    ]
    if too_small:
        need = max(BACKBONES[n].min_image_size for n in too_small)
        raise LeukoflowError(
            f"--image-size {image_size} is below what {', '.join(too_small)} accepts (>= {need})"
        )


# -- weights ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsChoice:
    """What the user asked for: `imagenet` (from a folder or the Keras cache) or `none`."""

    kind: str  # "imagenet" | "none"
    folder: str | None = None  # where the notop files are; None means $KERAS_HOME/models
    seed: int = 0  # the random initialisation's seed when kind == "none"

    @property
    def non_clinical(self) -> bool:
        return self.kind == "none"


def parse_weights(text: str, weights_dir: str | None, seed: int) -> WeightsChoice:
    """`imagenet`, `none`, or a folder of notop files (same as imagenet + --weights-dir)."""
    if text == "none":
        return WeightsChoice("none", seed=seed)
    if text == "imagenet":
        return WeightsChoice("imagenet", folder=weights_dir)
    if os.path.isdir(text):
        return WeightsChoice("imagenet", folder=text)
    raise LeukoflowError(f"--weights must be imagenet, none or a folder of weights; got {text!r}")


def uses_random_weights(names: list[str], choice: WeightsChoice) -> bool:
    """True when some CNN runs random-initialised: its outputs are not clinically meaningful."""
    return choice.non_clinical and any(not BACKBONES[n].full_resolution for n in names)


def keras_models_folder() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights_file(spec: BackboneSpec, choice: WeightsChoice) -> tuple[Path, str]:
    """The checked notop file for `spec` and its MD5; a clear one-line error when unusable."""
    folder = Path(choice.folder) if choice.folder else keras_models_folder()
    path = folder / spec.weights_file
    expected = f"MD5 {spec.weights_md5}" if spec.weights_md5 else "no published MD5"
    if not path.is_file():
        raise LeukoflowError(
            f"ImageNet weights for {spec.name} not found: {spec.weights_file} ({expected}) is not "
            f"in {folder}; copy it there, pass --weights-dir, or use --weights none for a "
            "non-clinical dry run"
        )
    md5 = file_md5(path)
    if spec.weights_md5 and md5 != spec.weights_md5:
        raise LeukoflowError(
            f"ImageNet weights for {spec.name} in {path} have MD5 {md5}, expected "
            f"{spec.weights_md5}: the file is damaged or not the Keras notop file"
        )
    return path, md5


def weights_id(spec: BackboneSpec, choice: WeightsChoice, precision: str = "fp32") -> str:
    """A stable id for the exact weights and precision, so vectors of either never mix.

    fp32 ids carry no suffix (every vector stored before precision existed is fp32); a CNN run in
    bf16 gets `+bf16`. Handcrafted extractors have no precision: their id is their version.
    """
    if spec.full_resolution:
        return importlib.import_module(spec.module).FEATURE_VERSION
    if choice.kind == "none":
        base = f"random-seed{choice.seed}"
    else:
        _, md5 = resolve_weights_file(spec, choice)
        base = f"imagenet-{md5[:12]}"
    return base if precision == "fp32" else f"{base}+{precision}"


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities() -> list[float]:
    """Compute capability of each GPU this process may use (empty without a visible NVIDIA GPU).

    Asks nvidia-smi rather than TensorFlow: the driver decides the precision and must not load
    TensorFlow (it costs seconds and prints log lines on the user's terminal).
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return []  # GPUs hidden from this process on purpose
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        answer = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    capabilities = []
    for line in answer.stdout.splitlines():
        try:
            capabilities.append(float(line.strip()))
        except ValueError:
            continue  # "[N/A]" on drivers too old to report it: counts as no bf16
    return capabilities


# Ampere (8.0) and later run bf16 on tensor cores; older cards emulate it slower than fp32.
BF16_MIN_COMPUTE_CAPABILITY = 8.0


def native_precision() -> str:
    """`bf16` where this machine runs it natively, else `fp32`; the choice is logged.

    With a visible GPU the models run there: bf16 when every card has bf16 tensor cores
    (compute capability >= 8.0). Without one: AMX or AVX512-BF16 CPUs.
    """
    gpus = gpu_compute_capabilities()
    if gpus:
        native = all(c >= BF16_MIN_COMPUTE_CAPABILITY for c in gpus)
        choice = "bf16" if native else "fp32"
        log.info("precision auto: %s (GPU compute capabilities %s)", choice, gpus)
        return choice
    flags = sorted({"amx_bf16", "avx512_bf16"} & cpu_flags())
    choice = "bf16" if flags else "fp32"
    log.info("precision auto: %s (no GPU; native bf16 CPU flags: %s)", choice, flags or "none")
    return choice


# -- models (run inside the actors) ----------------------------------------------------------
def build_model(
    spec: BackboneSpec,
    image_size: int,
    weights_path: str | None,
    seed: int,
    pooling: str | None = "avg",
    precision: str = "fp32",
):
    """The headless Keras application with a GAP layer; random-init from `seed` when no file.

    pooling=None returns the last convolutional feature map instead (its spatial mean is the GAP
    vector): the class activation maps of present/cam need it. precision "bf16" builds the model
    under Keras' `mixed_bfloat16` policy (bf16 arithmetic, float32 weights, so the same files
    and the same random init load); its GAP layer stays float32 so that the mean over the map is
    not rounded to bf16's 8 significant bits, and the output is float32 either way.
    """
    import keras

    module = importlib.import_module(f"keras.applications.{spec.module}")
    constructor = getattr(module, spec.constructor)
    arguments = {
        "include_top": False,
        "weights": weights_path,
        "input_shape": (image_size, image_size, 3),
        "pooling": None if precision == "bf16" else pooling,
    }
    with _dtype_policy(precision):
        if weights_path is not None:
            model = constructor(**arguments)
        else:
            keras.utils.set_random_seed(seed)
            with _private_initializer_seeds(seed):
                model = constructor(**arguments)
    if precision != "bf16":
        return model
    head = model.output
    if pooling == "avg":
        head = keras.layers.GlobalAveragePooling2D(dtype="float32", name="gap_float32")(head)
    else:
        head = keras.layers.Activation("linear", dtype="float32", name="map_float32")(head)
    return keras.Model(model.input, head, name=f"{model.name}_bf16")


PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}


@contextmanager
def _dtype_policy(precision: str) -> Iterator[None]:
    """Keras' dtype policy for one model's construction only (it is thread-local in Keras 3)."""
    import keras

    if precision not in PRECISION_POLICIES:
        raise ValueError(f"unknown precision {precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISION_POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


_SEEDING = threading.Lock()


@contextmanager
def _private_initializer_seeds(seed: int) -> Iterator[None]:
    """Keras draws every unseeded initializer's seed from the global `random` module, which any
    other thread of the process (Prefect's, Ray's) may draw from too and so change the "same"
    random init. A private Random(seed) gives the sequence random.seed(seed) gives, whatever
    other threads do; the lock keeps two of our own builds from sharing it."""
    from keras.src.random import seed_generator

    with _SEEDING:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared


def preprocess(spec: BackboneSpec, pixels: np.ndarray) -> np.ndarray:
    """The backbone's own standardisation of float RGB pixels in 0..255 (a copy)."""
    module = importlib.import_module(f"keras.applications.{spec.module}")
    return module.preprocess_input(np.array(pixels, dtype=np.float32, copy=True))
