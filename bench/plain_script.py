"""The baseline: feature extraction as the paper's authors would have scripted it.

Decode every image with PIL into one in-memory array, then for each backbone in turn build the
Keras model and call `model.predict` over the whole array, and save the concatenated features.
No Ray, no Prefect, no store. Run as a child process by the harness:

    python -m bench.plain_script IMAGES_DIR OUT_DIR --backbones vgg16,... --image-size 224
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

STARTED = time.perf_counter()  # module import time: the script's own start, imports included


def decode_all(paths: list[Path], image_size: int) -> np.ndarray:
    """Every image, decoded and resized, in one (N, S, S, 3) float32 array."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            arrays.append(np.asarray(resized, dtype=np.float32))
    return np.stack(arrays)


def batch_clock():
    """A Keras callback recording when each predict batch ends."""
    import keras

    class BatchClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

        def on_predict_batch_end(self, batch, logs=None) -> None:
            self.ends.append(time.perf_counter())

    return BatchClock()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--backbones", default="vgg16,densenet121,inception_resnet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", default="none", help="none (random init, seed 0) or DIR")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if args.precision == "bf16":
        # What Keras' mixed-precision guide tells a script author to write: one global policy.
        keras.config.set_dtype_policy("mixed_bfloat16")

    from leukoflow.features.backbones import BACKBONES

    imported = time.perf_counter()
    paths = sorted(args.images.rglob("*.bmp"))
    t0 = time.perf_counter()
    pixels = decode_all(paths, args.image_size)
    decode_seconds = time.perf_counter() - t0

    features, per_backbone = [], {}
    for name in args.backbones.split(","):
        spec = BACKBONES[name]
        module = importlib.import_module(f"keras.applications.{spec.module}")
        t0 = time.perf_counter()
        if args.weights == "none":
            keras.utils.set_random_seed(0)
        weights = None if args.weights == "none" else str(Path(args.weights) / spec.weights_file)
        model = getattr(module, spec.constructor)(
            include_top=False,
            weights=weights,
            input_shape=(args.image_size, args.image_size, 3),
            pooling="avg",
        )
        t1 = time.perf_counter()
        clock = batch_clock()
        vectors = model.predict(
            module.preprocess_input(pixels.copy()),
            batch_size=args.batch_size,
            verbose=0,
            callbacks=[clock],
        )
        t2 = time.perf_counter()
        features.append(vectors)
        per_backbone[name] = {
            "load_seconds": t1 - t0,
            "predict_seconds": t2 - t1,
            "batch_ends": [t - t1 for t in clock.ends],
        }
        del model
        keras.backend.clear_session()

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "features.npy", np.concatenate(features, axis=1))
    finished = time.perf_counter()
    timings = {
        "n_images": len(paths),
        "batch_size": args.batch_size,
        "precision": args.precision,
        "import_seconds": imported - STARTED,
        "decode_seconds": decode_seconds,
        "backbones": per_backbone,
        "script_seconds": finished - STARTED,
    }
    (args.out / "timings.json").write_text(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
