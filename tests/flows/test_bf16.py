"""`--precision bf16` end to end: the real `run` flow trains a bf16 model, the real nightly sweep
scores new cells with it; and what `auto` must give on this machine and on one without bf16.

In-process flows (local Ray, the session's Prefect server), vgg16 at 32 px, random init. Where
the CPU has AVX512-BF16 or AMX the convolutions run in bf16 natively; elsewhere TensorFlow
emulates them (slower, same answer), so an explicit bf16 run works on any machine. What differs
between machines is `auto`: the test reads the CPU flags itself (tests/native_bf16.py) and
asserts the product's answer for this machine; the answer for a machine without bf16 is taken
through the product's own hardware probe (features/backbones.cpu_flags, gpu_compute_capabilities),
answering "no bf16 here". Scoring at a precision the model was not trained at is refused: parity
was never shown for the CNNs (scoring/score.scoring_recipe).
"""

from __future__ import annotations

import pytest
from native_bf16 import native_precision

from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb
from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.recipe import FeatureRecipe
from leukoflow.scoring.score import SweepSettings
from leukoflow.store import registry
from leukoflow.store.storage import open_location
from leukoflow.store.tables import featurised_ids, read_catalog, read_predictions, read_runs

pytestmark = pytest.mark.integration

BF16 = FeatureRecipe(("vgg16",), weights="none", image_size=32, precision="bf16")
SETTINGS = SweepSettings(drift_min_cells=1000)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, ray_local, prefect_harness):
    """A store whose current model was trained by `run --precision bf16` on 24 synthetic cells."""
    from leukoflow.flows.run import run_pipeline

    work = tmp_path_factory.mktemp("bf16")
    images = make_synthetic_dataset(
        work / "train", n_subjects=6, cells_per_subject=4, image_side=48, seed=0
    )
    store = work / "store"
    summary = run_pipeline(images=str(images), store=str(store), recipe=BF16, examples_per_kind=0)
    return store, work, summary


def _inbox(work, seed: int):
    """12 cells no other test scores (a sweep scores only what its model has not scored)."""
    return make_synthetic_dataset(
        work / f"inbox-{seed}", n_subjects=4, cells_per_subject=3, image_side=48, seed=seed
    )


def _sweep(store, inbox, date: str, precision: str | None = None) -> dict:
    from leukoflow.flows.score import score_inbox

    return score_inbox(
        inbox=str(inbox), store=str(store), date=date, sweep=SETTINGS, precision=precision
    )


def test_a_bf16_run_records_bf16_and_stores_bf16_vectors(bf16_model):
    store, _, summary = bf16_model
    root = open_location(str(store))
    _, record = registry.load_model(root, summary["model_id"])
    assert record.feature_recipe["precision"] == "bf16"
    assert record.feature_recipe["weights_ids"] == {"vgg16": "random-seed0+bf16"}
    assert summary["counts"]["featurised"] == 24
    trained_on = {row["image_id"] for row in read_catalog(root, "default").to_pylist()}
    assert len(trained_on) == 24
    assert trained_on <= featurised_ids(root, "vgg16", "random-seed0+bf16", 32)
    assert featurised_ids(root, "vgg16", "random-seed0", 32) == set()  # no fp32 vector made
    assert registry.resolve_model_id(root, "current") == summary["model_id"]


def test_the_sweep_scores_new_cells_at_the_models_bf16(bf16_model):
    store, work, summary = bf16_model
    root = open_location(str(store))
    night = _sweep(store, _inbox(work, 1), "2026-04-01")
    assert night["outcome"] == "completed" and night["model_id"] == summary["model_id"]
    assert night["counts"]["scored"] == 12
    predicted = read_predictions(root, "2026-04-01", summary["model_id"], columns=["image_id"])
    assert predicted.num_rows == 12
    # The new cells' vectors were made in bf16, under the bf16 key only.
    assert set(predicted.column("image_id").to_pylist()) <= featurised_ids(
        root, "vgg16", "random-seed0+bf16", 32
    )
    assert featurised_ids(root, "vgg16", "random-seed0", 32) == set()


def test_auto_scores_or_is_refused_as_this_machine_requires(bf16_model):
    """`score --precision auto` resolves to this machine's native precision: bf16 here (the
    model's own, scored) where the CPU has it, fp32 (refused) where it has not."""
    store, work, summary = bf16_model
    root = open_location(str(store))
    inbox = _inbox(work, 2)
    if native_precision() == "bf16":
        night = _sweep(store, inbox, "2026-04-02", precision="auto")
        assert night["outcome"] == "completed" and night["counts"]["scored"] == 12
        assert read_predictions(root, "2026-04-02", summary["model_id"]).num_rows == 12
    else:
        with pytest.raises(LeukoflowError, match="fp32 parity was never shown for vgg16"):
            _sweep(store, inbox, "2026-04-02", precision="auto")
        assert read_predictions(root, "2026-04-02", summary["model_id"]).num_rows == 0


def test_without_bf16_hardware_auto_is_fp32_and_scoring_the_bf16_model_so_is_refused(
    bf16_model, monkeypatch
):
    """The product's probe answering as a CPU without bf16 (AVX2 only) and no GPU."""
    store, work, summary = bf16_model
    inbox = _inbox(work, 3)
    monkeypatch.setattr(bb, "gpu_compute_capabilities", lambda: [])
    monkeypatch.setattr(bb, "cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma"})
    assert FeatureRecipe(("vgg16",), weights="none", precision="auto").precision == "fp32"
    root = open_location(str(store))
    runs_before = read_runs(root).num_rows
    for precision in ("auto", "fp32"):
        with pytest.raises(LeukoflowError) as refused:
            _sweep(store, inbox, "2026-04-03", precision=precision)
        assert str(refused.value) == (
            "the model was trained on bf16 vectors and fp32 parity was never shown for vgg16: "
            "score at --precision bf16"
        )
    # Refused before anything was read or written: no night, no run row.
    assert read_predictions(root, "2026-04-03", summary["model_id"]).num_rows == 0
    assert read_runs(root).num_rows == runs_before
