"""No raw subject id outside the store's tables: every command's output, every page, picture and
log line, and Prefect's own database show keyed pseudonyms only.

C-NMC's bare numeric subject ids cannot show a leak (a "7" is everywhere); these cells carry
medical-record-number-like ids, which appear nowhere by chance.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog, read_predictions

from .harness import SMALL_RUN, last_json, leukoflow

pytestmark = pytest.mark.integration

N_SUBJECTS, CELLS = 6, 4


def mrn(k: int) -> str:
    return f"MRN-00{48213 + k}-{70 + k}"


def mrn_manifest(folder: Path, name: str, seed: int) -> tuple[Path, list[str]]:
    """Synthetic cells renamed without ids (cell-NN.bmp) and a manifest with MRN-like ids."""
    source = make_synthetic_dataset(
        folder / f"src-{name}", n_subjects=N_SUBJECTS, cells_per_subject=CELLS, image_side=48,
        seed=seed,
    )  # fmt: skip
    cells = folder / name
    cells.mkdir(parents=True)
    rows, ids = [], []
    for k, path in enumerate(sorted(source.rglob("*.bmp"))):
        subject = path.name.split("_")[1]  # "3" or "H5": one MRN per synthetic subject
        ident = mrn(int(subject.lstrip("H")) + (100 if subject.startswith("H") else 0))
        target = cells / f"cell-{k:02d}.bmp"
        shutil.copy(path, target)
        rows.append({"path": target.name, "label": path.parent.name, "subject_id": ident})
        ids.append(ident)
    manifest = cells / "MANIFEST.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "subject_id"])
        writer.writeheader()
        writer.writerows(rows)
    shutil.rmtree(source)
    return manifest, sorted(set(ids))


def test_no_command_page_log_or_prefect_record_shows_a_raw_subject_id(cli, tmp_path):
    env = cli.env(COLUMNS="200")
    store, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    train, ids = mrn_manifest(tmp_path, "train", seed=3)
    inbox_manifest, inbox_ids = mrn_manifest(tmp_path, "inbox", seed=4)
    ids = sorted(set(ids) | set(inbox_ids))
    common = ("--store", store, *SMALL_RUN)
    # LEUKOFLOW_DEBUG off, but every log level on: a DEBUG line must not leak either.
    debug_env = {**env, "PREFECT_LOGGING_LEVEL": "DEBUG"}
    results = {
        "run": leukoflow("run", train, *common, "--json", env=debug_env),
        "backfill": leukoflow("backfill", inbox_manifest, "--dataset", "night",
                              *common, "--json", env=env),
        "score": leukoflow("score", inbox_manifest, "--store", store, "--json",
                           "--explain-flagged", env=debug_env),
        "score-text": leukoflow("score", inbox_manifest, "--store", store, env=env),
        "status": leukoflow("status", "--store", store, env=env),
        "dashboard": leukoflow("dashboard", "--store", store, "--out", out / "dash.html",
                               env=env),
        "explain": leukoflow("explain", inbox_manifest.parent / "cell-00.bmp", "--store", store,
                             "--out", out / "cell.png", "--json", env=env),
        "models": leukoflow("models", "show", "current", "--store", store, env=env),
    }  # fmt: skip
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-2000:])
    root = open_location(str(store))
    # The ids are really in the store's tables (the scan below could not miss them otherwise).
    catalogued = set(read_catalog(root).column("subject_id").to_pylist())
    assert set(ids) <= catalogued
    assert set(read_predictions(root).column("subject_id").to_pylist()) <= set(inbox_ids)
    assert last_json(results["score"].stdout)["night"]["subjects"] == N_SUBJECTS

    texts = {f"{name} {stream}": getattr(result, stream)
             for name, result in results.items() for stream in ("stdout", "stderr")}  # fmt: skip
    # Pages, pictures, reports and explanations written inside or outside the store: everything
    # but the Parquet tables, the only place raw ids may live.
    for path in [*out.rglob("*"), *store.rglob("*")]:
        if path.is_file() and path.suffix != ".parquet":
            texts[str(path)] = path.read_bytes().decode("latin-1")
    # Prefect's database, every table (logs at every level, artifacts, parameters, states).
    texts["prefect.db"] = cli.prefect_db.read_bytes().decode("latin-1")
    for wal in cli.prefect_db.parent.glob("prefect.db-*"):
        texts[str(wal)] = wal.read_bytes().decode("latin-1")
    leaks = [(where, ident) for where, text in texts.items() for ident in ids if ident in text]
    assert leaks == []
    # What is shown instead: the keyed pseudonyms.
    salt = subject_salt(root)
    shown = texts["score stdout"] + texts["dashboard stdout"] + texts[str(out / "dash.html")]
    assert any(subject_key(ident, salt) in shown for ident in inbox_ids)
