"""bf16 against fp32 on real cells: does a feature vector computed in bf16 change anything?

For each cell: the cosine similarity of its bf16 vector to its fp32 vector, per backbone and for
the joined vector; then the paper's linear SVM, trained on fp32 vectors in subject-grouped folds,
scores every held-out cell twice (fp32 and bf16 vectors): the share of cells whose decision is
unchanged. Vectors are cached per backbone and precision in `--cache`, so a long run resumes.

    .venv/bin/python -m bench.precision_parity --n 0 --out bench-output/parity.json

`--n 0` uses every cell of the sources; a smaller N takes a fixed random subset stratified by
subject (the same cells for the same --seed). Timing: `--rate-only` measures seconds per cell
per precision on the first 32 cells and stops.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# The development cells: `shared/data` beside the clone, or LEUKOFLOW_SHARED_DATA.
SHARED_DATA = Path(
    os.environ.get("LEUKOFLOW_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)
DEFAULT_SOURCES = (str(SHARED_DATA / "cnmc"), str(SHARED_DATA / "cnmc-pool"))


def read_cells(sources: list[str]) -> list[dict]:
    """Every cell listed in the sources' MANIFEST.csv: path, label (1 = all), subject."""
    cells = []
    for source in sources:
        with open(Path(source) / "MANIFEST.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                cells.append({
                    "path": str(Path(source) / row["path"]),
                    "label": 1 if row["label"] == "all" else 0,
                    "subject": row["subject_id"],
                })  # fmt: skip
    return cells


def stratified_subset(cells: list[dict], n: int, seed: int) -> list[dict]:
    """A fixed random subset of about `n` cells, each subject kept in proportion (at least one)."""
    if n <= 0 or n >= len(cells):
        return cells
    rng = np.random.default_rng(seed)
    by_subject: dict[str, list[int]] = {}
    for k, cell in enumerate(cells):
        by_subject.setdefault(cell["subject"], []).append(k)
    chosen = []
    for subject in sorted(by_subject):
        rows = by_subject[subject]
        take = max(1, round(n * len(rows) / len(cells)))
        chosen += list(rng.permutation(rows)[:take])
    return [cells[k] for k in sorted(chosen)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)


def decode_all(cells: list[dict], image_size: int) -> np.ndarray:
    from leukoflow.features.images import decode_image, resize_pixels

    return np.stack([
        resize_pixels(decode_image(Path(c["path"]).read_bytes()).pixels, image_size) for c in cells
    ])  # fmt: skip


def featurise(name, precision, pixels, image_size, choice, batch_size, cache: Path) -> np.ndarray:
    """Vectors of every cell for one backbone and precision, cached as .npy (resumable); the
    file name carries a digest of the pixels, so another subset never reads these vectors."""
    from leukoflow.features import backbones as bb
    from leukoflow.features.extract import Featuriser

    digest = hashlib.sha256(pixels.tobytes()).hexdigest()[:12]
    target = cache / f"{name}-{precision}-{choice.kind}{choice.seed}-{image_size}-{digest}.npy"
    if target.exists():
        return np.load(target)
    featuriser = Featuriser(bb.BACKBONES[name], image_size, choice, precision)
    parts = [featuriser(pixels[k : k + batch_size]) for k in range(0, len(pixels), batch_size)]
    vectors = np.concatenate(parts)
    np.save(target, vectors)
    return vectors


def unchanged_decisions(x32, x16, y, subjects, folds: int, seed: int) -> dict:
    """Paper's linear SVM trained on fp32 vectors per subject-grouped fold; every held-out cell
    scored with its fp32 and its bf16 vector."""
    from leukoflow import choices
    from leukoflow.learn import train

    split = train.kfold(y, subjects, folds, seed)
    same, flipped_margins, total, correct32, correct16 = 0, [], 0, 0, 0
    for train_rows, test_rows in split.indices:
        model = train.fit(choices.DEFAULT_CLASSIFIER, x32[train_rows], y[train_rows], seed)
        d32 = model.decision_function(x32[test_rows])
        d16 = model.decision_function(x16[test_rows])
        p32, p16 = d32 >= 0, d16 >= 0
        same += int((p32 == p16).sum())
        flipped_margins += [float(abs(v)) for v in d32[p32 != p16]]
        total += len(test_rows)
        correct32 += int((p32 == y[test_rows]).sum())
        correct16 += int((p16 == y[test_rows]).sum())
    return {
        "folds": split.k,
        "grouped_by": split.grouping,
        "cells": total,
        "unchanged": same,
        "unchanged_share": same / total,
        "flipped_fp32_margins": flipped_margins,
        "accuracy_fp32": correct32 / total,
        "accuracy_bf16": correct16 / total,
    }


def noise_over_spread(x32: np.ndarray, x16: np.ndarray) -> dict:
    """Per feature, the spread of bf16's error over the spread of the feature across cells.

    What a standardising classifier sees: cosine alone can mislead where all cells' vectors
    are alike (random-init networks: two different cells have cosine 0.999 there), because the
    classifier works on the small differences between cells, and bf16's error is measured
    against those.
    """
    spread = x32.std(axis=0)
    varying = spread > 0
    ratio = (x16 - x32).std(axis=0)[varying] / spread[varying]
    normed = x32 / np.linalg.norm(x32, axis=1, keepdims=True)
    between = (normed @ normed.T)[np.triu_indices(len(x32), 1)]
    return {
        "median": float(np.median(ratio)),
        "p90": float(np.percentile(ratio, 90)),
        "cosine_between_different_cells_min": float(between.min()),
        "cosine_between_different_cells_median": float(np.median(between)),
    }


def summarise(cos: np.ndarray) -> dict:
    return {
        "min": float(cos.min()),
        "p1": float(np.percentile(cos, 1)),
        "median": float(np.median(cos)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precision_parity", description=__doc__)
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES))
    parser.add_argument("--backbones", default="vgg16,densenet121,inception_resnet_v2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default="none", help="none (seeded random init) or imagenet")
    parser.add_argument("--n", type=int, default=0, help="cells (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", default="bench-output/parity-cache")
    parser.add_argument("--out", default="bench-output/parity.json")
    parser.add_argument("--rate-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from leukoflow.features import backbones as bb

    names = bb.parse_backbones(args.backbones)
    choice = bb.parse_weights(args.weights, None, args.seed)
    cells = stratified_subset(read_cells(args.sources.split(",")), args.n, args.seed)
    if args.rate_only:
        cells = cells[:32]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print(f"parity: {len(cells)} cells, {len({c['subject'] for c in cells})} subjects", flush=True)
    pixels = decode_all(cells, args.image_size)
    vectors: dict[tuple[str, str], np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in names:
        for precision in ("fp32", "bf16"):
            started = time.perf_counter()
            vectors[name, precision] = featurise(
                name, precision, pixels, args.image_size, choice, args.batch_size, cache
            )
            seconds[f"{name}/{precision}"] = time.perf_counter() - started
            print(f"  {name} {precision}: {seconds[f'{name}/{precision}']:.1f} s", flush=True)
    per_backbone = {
        name: summarise(cosine(vectors[name, "fp32"], vectors[name, "bf16"])) for name in names
    }
    x32 = np.concatenate([vectors[n, "fp32"] for n in names], axis=1)
    x16 = np.concatenate([vectors[n, "bf16"] for n in names], axis=1)
    result = {
        "command": " ".join(
            [
                sys.executable.rsplit("/", 1)[-1],
                "-m",
                "bench.precision_parity",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),  # fmt: skip
        "cells": len(cells),
        "subjects": len({c["subject"] for c in cells}),
        "backbones": names,
        "image_size": args.image_size,
        "weights": choice.kind,
        "cosine_joined": summarise(cosine(x32, x16)),
        "cosine_per_backbone": per_backbone,
        "noise_over_spread_per_backbone": {
            name: noise_over_spread(vectors[name, "fp32"], vectors[name, "bf16"]) for name in names
        },
        "seconds": seconds,
    }
    if not args.rate_only:
        y = np.array([c["label"] for c in cells])
        subjects = [c["subject"] for c in cells]
        result["svm"] = unchanged_decisions(x32, x16, y, subjects, args.folds, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
