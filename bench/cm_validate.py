"""Compare `color_morphology` feature variants on the development pool, subject-grouped.

The protocol of docs/color_morphology.md ("Developing cm-2", rounds 1-4): the pool's cells (one
or more manifests with path, label, subject_id), the product's subject-grouped folds and
classifiers through the product's one fold runner (`learn/validate.cross_validate` over
`learn/folds`), at cell level and at patient level (learn/patient.py's rule, the threshold chosen
on the training folds only, from inner subject-grouped folds). A development
tool, not part of the wheel. Features are cached under --cache (never in the repository): re-runs
only refit.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.cm_validate \\
        ../shared/data/cnmc/MANIFEST.csv ../shared/data/cnmc-pool/MANIFEST.csv

Without manifests it reads those two, from `shared/data` beside the clone or from
LEUKOFLOW_SHARED_DATA.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from leukoflow import choices
from leukoflow.features import color_morphology as cm
from leukoflow.learn import evaluate, folds, patient, train, validate

SHARED_DATA = Path(
    os.environ.get("LEUKOFLOW_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)
DEFAULT_MANIFESTS = (
    SHARED_DATA / "cnmc" / "MANIFEST.csv",
    SHARED_DATA / "cnmc-pool" / "MANIFEST.csv",
)

# name -> (colour normalisation, feature blocks): the pre-declared variants, nothing else.
# Colour normalisation: "raw" none, "cell" per image (round 1), "subject" one transform per
# subject from all its cells' pixels (round 4).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cm-1": ("raw", ("base",)),
    "stain": ("cell", ("base",)),
    "nc": ("raw", ("base", "nc")),
    "contour": ("raw", ("base", "contour")),
    "all-raw": ("raw", ("base", "nc", "contour")),
    "all": ("cell", ("base", "nc", "contour")),
    "subject-stain": ("subject", ("base",)),
}
# Cache file suffix of each colour mode (rounds 1-3 wrote "raw" and "norm").
_MODE_FILES = {"raw": "raw", "cell": "norm", "subject": "subject"}
FOLDS, SEED, N_BOOT = choices.DEFAULT_FOLDS, choices.DEFAULT_SEED, choices.DEFAULT_BOOTSTRAP


def read_manifests(paths: list[Path]) -> list[dict[str, str]]:
    """Rows (file, label, subject, sha256) of every manifest, paths resolved beside it."""
    rows = []
    for manifest in paths:
        with manifest.open(newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append(
                    {
                        "file": str(manifest.parent / row["path"]),
                        "label": row["label"],
                        "subject": row["subject_id"],
                        "sha256": row["sha256"],
                    }
                )
    return rows


def _code_digest() -> str:
    """Cached vectors are valid for exactly this extractor source, less the lines that only say
    which blocks the version ships (they change no block's values)."""
    lines = Path(cm.__file__).read_text().splitlines()
    kept = [ln for ln in lines if not ln.startswith(("SHIPPED_", "FEATURE_VERSION"))]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def _pixels(row: dict[str, str]) -> np.ndarray:
    with Image.open(row["file"]) as image:
        return np.asarray(image.convert("RGB"))


def _subject_references(rows: list[dict[str, str]]) -> dict[str, tuple | None]:
    """Per subject, the pooled RGB mean and std of all its cells' pixels (no label used)."""
    pooled: dict[str, cm.ColourMoments] = {}
    for row in rows:
        moments = cm.colour_moments(_pixels(row))
        subject = row["subject"]
        pooled[subject] = pooled[subject] + moments if subject in pooled else moments
    return {subject: m.reference() for subject, m in pooled.items()}


def extract_all(
    rows: list[dict[str, str]], cache: Path, modes: tuple[str, ...] = ("raw", "cell")
) -> dict[str, dict[str, np.ndarray]]:
    """Every block in each colour mode asked for, for every row: from the cache or computed."""
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256("".join(r["sha256"] for r in rows).encode()).hexdigest()[:12]
    out: dict[str, dict[str, np.ndarray]] = {}
    todo = []
    for mode in modes:
        path = cache / f"{_code_digest()}-{key}-{_MODE_FILES[mode]}.npz"
        if path.exists():
            with np.load(path) as data:
                out[mode] = {name: data[name] for name in cm.BLOCK_CATALOGUES}
        else:
            todo.append((mode, path))
    if not todo:
        return out
    references = _subject_references(rows) if any(m == "subject" for m, _ in todo) else {}
    blocks = {m: {name: [] for name in cm.BLOCK_CATALOGUES} for m, _ in todo}
    seconds = 0.0
    for i, row in enumerate(rows):
        pixels = _pixels(row)
        start = time.perf_counter()
        for mode, _ in todo:
            reference = references.get(row["subject"]) if mode == "subject" else None
            values = cm.feature_blocks(pixels, mode == "cell", reference=reference)
            for name, vector in values.items():
                blocks[mode][name].append(vector)
        seconds += time.perf_counter() - start
        if (i + 1) % 100 == 0:
            print(
                f"  {i + 1}/{len(rows)} cells, {seconds / (i + 1) * 1000:.0f} ms/cell", flush=True
            )
    for mode, path in todo:
        out[mode] = {name: np.asarray(v) for name, v in blocks[mode].items()}
        np.savez(path, **out[mode])
    return out


def _patient_summary(level: dict) -> dict:
    """The bench's patient figures from learn/patient.patient_metrics (or the `patient_level`
    of learn/validate.cross_validate): the one patient rule of the product."""
    decisions = [
        {
            "subject": p["subject_id"],
            "label": int(p["label"] == evaluate.POSITIVE_LABEL),
            "score": p["score"],
            "threshold": p["threshold"],
            "call": int(p["flagged"]),
            "cells": p["n_cells"],
        }
        for p in level["patients"]
    ]
    metrics = level["metrics"]
    ba = metrics["balanced_accuracy"]
    return {
        "correct": sum(p["correct"] for p in level["patients"]),
        "patients": level["n_patients"],
        # cross_validate reports pooled values beside the fold means; patient_metrics a value
        "sensitivity": metrics["sensitivity"].get("pooled", metrics["sensitivity"].get("value")),
        "specificity": metrics["specificity"].get("pooled", metrics["specificity"].get("value")),
        "balanced_accuracy": ba.get("pooled", ba.get("value")),
        "balanced_accuracy_interval": [ba["low"], ba["high"]],
        "wrong": [d for d in decisions if d["call"] != d["label"]],
        "decisions": decisions,
    }


def held_out_check(dev: tuple, test: tuple, classifier: str) -> dict:
    """Fit on the whole development pool (patient threshold from its inner folds), then measure
    once on cells of other subjects: `dev` and `test` are (x, y, subjects). No choice is made
    on the held-out side: this is the independent check of a recipe declared beforehand."""
    (x, y, subjects), (x_test, y_test, s_test) = dev, test
    shared = set(subjects) & set(s_test)
    if shared:
        raise ValueError(f"the held-out cells share {len(shared)} subject(s) with the pool")
    threshold = folds.patient_threshold(x, y, list(subjects), classifier, FOLDS, SEED)
    model = train.fit(classifier, x, y, SEED, subjects)
    scores, kind = train.decision_scores(model, x_test)
    cell_threshold = folds.CELL_THRESHOLDS[kind]
    flagged = (scores >= cell_threshold).astype(np.int64)
    metrics = evaluate.compute_metrics(y_test, flagged, scores)
    cell = {"n": int(len(y_test)), "subjects": len(set(s_test))}
    for key in ("balanced_accuracy", "roc_auc"):
        low, high = evaluate.bootstrap_interval(
            y_test, flagged, scores, key, n_boot=N_BOOT, seed=SEED, groups=list(s_test)
        )
        cell[key] = {"value": metrics[key], "low": low, "high": high}
    decisions = patient.decide(
        patient.patient_scores(list(s_test), scores, cell_threshold), threshold
    )
    labels, _ = patient.patient_labels(list(s_test), y_test)
    level = patient.patient_metrics(decisions, labels, n_boot=N_BOOT, seed=SEED)
    return {"cell": cell, "patient": _patient_summary(level)}


def _matrix(blocks: dict[str, dict[str, np.ndarray]], variant: str) -> np.ndarray:
    mode, names = VARIANTS[variant]
    return np.concatenate([blocks[mode][name] for name in names], axis=1)


def run_variant(
    blocks: dict[str, dict[str, np.ndarray]], variant: str, y, subjects, classifier: str
) -> dict:
    x = _matrix(blocks, variant)
    cell = validate.cross_validate(x, y, list(subjects), classifier, FOLDS, SEED, N_BOOT)
    return {
        "variant": variant,
        "classifier": classifier,
        "dim": int(x.shape[1]),
        "cell": cell,
        "patient": _patient_summary(cell["patient_level"]),
    }


def _row(result: dict) -> str:
    """One markdown row: cross-validated (mean ± std [interval]) or held-out (value [interval])."""
    c, p = result["cell"], result["patient"]
    cells = []
    for k in ("balanced_accuracy", "roc_auc"):
        if "metrics" in c:  # cross-validation
            m = c["metrics"][k]
            cells.append(f"{m['mean']:.3f} ± {m['std']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
        else:  # the held-out check
            cells.append(f"{c[k]['value']:.3f} [{c[k]['low']:.3f}, {c[k]['high']:.3f}]")
    low, high = p["balanced_accuracy_interval"]
    return (
        f"| `{result['variant']}` | `{result['classifier']}` | {result['dim']} | "
        + " | ".join(cells)
        + f" | {p['correct']}/{p['patients']} | {p['sensitivity']:.3f} / {p['specificity']:.3f}"
        + f" | {p['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}] |"
    )


def _wrong_call(decision: dict) -> str:
    truth = "ALL" if decision["label"] else "normal"
    return (
        f"{decision['subject']} ({truth}, {decision['cells']} cells, "
        f"score {decision['score']:.2f} vs threshold {decision['threshold']:.2f})"
    )


def _load(manifests: list[Path], cache: Path, modes: tuple[str, ...]):
    """Labels, subjects and feature blocks of the cells of `manifests`."""
    rows = read_manifests(manifests)
    y = evaluate.labels_to_int([r["label"] for r in rows])
    subjects = np.array([r["subject"] for r in rows])
    print(f"{len(rows)} cells, {len(set(subjects))} subjects; extracting (cached in {cache})")
    return y, subjects, extract_all(rows, cache, modes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "manifests",
        nargs="*",
        type=Path,
        default=list(DEFAULT_MANIFESTS),
        help="the pool's manifests (default: the development pool in shared/data)",
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cm_validate"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--classifiers",
        default=choices.DEFAULT_CLASSIFIER,
        help=f"comma-separated, of {', '.join(train.CLASSIFIERS)} and {train.TUNED}; each "
        "variant is fitted with each",
    )
    parser.add_argument(
        "--held-out",
        nargs="+",
        type=Path,
        metavar="MANIFEST",
        help="cells of other subjects: fit on the pool once and measure on these instead of "
        "cross-validating (the independent check of docs/color_morphology.md)",
    )
    parser.add_argument("--json", type=Path, help="write every number here too")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    modes = tuple(dict.fromkeys(VARIANTS[v][0] for v in variants))
    y, subjects, blocks = _load(args.manifests, args.cache, modes)
    test = _load(args.held_out, args.cache, modes) if args.held_out else None
    if test is not None and set(subjects) & set(test[1]):
        parser.error(
            f"--held-out shares {len(set(subjects) & set(test[1]))} subject(s) with the pool"
        )
    results = []
    what = "held-out" if test else "fold-mean"
    print(
        f"| variant | classifier | dim | cell balanced accuracy ({what}) | cell ROC AUC "
        "| patients correct | patient sens / spec | patient balanced accuracy |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for variant in variants:
        for classifier in args.classifiers.split(","):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if test is None:
                    result = run_variant(blocks, variant, y, subjects, classifier)
                else:
                    x_test = _matrix(test[2], variant)
                    result = {
                        "variant": variant,
                        "classifier": classifier,
                        "dim": int(x_test.shape[1]),
                        **held_out_check(
                            (_matrix(blocks, variant), y, subjects),
                            (x_test, test[0], test[1]),
                            classifier,
                        ),
                    }
            result["warnings"] = sorted({str(w.message)[:120] for w in caught})
            results.append(result)
            print(_row(result), flush=True)
    for result in results:
        wrong = ", ".join(_wrong_call(d) for d in result["patient"]["wrong"])
        print(f"{result['variant']} {result['classifier']}: wrong patients: {wrong or 'none'}")
        print(f"  warnings: {result['warnings'] or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
