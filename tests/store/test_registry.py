"""The model registry: models are verified on every load, ids cannot name other paths, and the
current pointer changes only by compare-and-swap, never to a non-clinical model unforced."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.learn import calibration, train
from leukoflow.store import model_io, registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.registry import ModelRefused
from leukoflow.store.storage import Location, open_location

KEY = "a-long-enough-test-key-0123456789"


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    y = (x[:, 0] > 0).astype(int)
    return calibration.fit_calibrated("linear-svm", x, y, train.kfold(y, [None] * 40, n_folds=3))


def record_of(model_id: str, non_clinical: bool = False, threshold: float = 0.42) -> ModelRecord:
    return ModelRecord(
        model_id,
        classifier="linear-svm",
        feature_recipe={"backbones": ["vgg16"], "dims": [4], "image_size": 32},
        score_kind="probability",
        threshold=threshold,
        non_clinical=non_clinical,
        metrics={"accuracy": 0.9},
    )


@pytest.fixture
def store(tmp_path, monkeypatch) -> Location:
    monkeypatch.delenv(registry.KEY_ENV, raising=False)
    return open_location(str(tmp_path / "store"))


def save(store: Location, fitted, model_id: str, **fields) -> Path:
    registry.save_model(store, model_id, fitted, record_of(model_id, **fields))
    return Path(store.path) / "models" / model_id


# -- save and verify -------------------------------------------------------------------------
def test_save_records_the_sha256_of_every_model_file(store, fitted) -> None:
    folder = save(store, fitted, "m-1")
    integrity = json.loads((folder / "integrity.json").read_text())
    assert integrity["model_id"] == "m-1" and integrity["signature"] is None
    for name in ("model.skops", "model.json"):
        assert integrity["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    model, record = registry.load_model(store, "m-1")
    assert record == record_of("m-1")
    assert registry.load_record(store, "m-1") == record
    assert model.predict(np.zeros((1, 4))).shape == (1,)
    assert registry.verify_model(store, "m-1") == integrity


def test_changed_model_bytes_are_refused(store, fitted) -> None:
    folder = save(store, fitted, "m-1")
    data = bytearray((folder / "model.skops").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.skops").write_bytes(bytes(data))
    for load in (registry.load_model, registry.load_record):
        with pytest.raises(ModelRefused, match="model file refused.*model.skops is not the file"):
            load(store, "m-1")


def test_a_smuggled_type_is_named_in_the_refusal(store, fitted) -> None:
    folder = save(store, fitted, "m-1")
    model, _ = registry.load_model(store, "m-1")
    model.steps[-1][1].smuggled = os.system  # what an attacker would want called on load
    (folder / "model.skops").write_bytes(model_io.model_to_bytes(model))
    with pytest.raises(ModelRefused) as refused:
        registry.load_model(store, "m-1")
    assert "sha256 differs" in str(refused.value) and "posix.system" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_changed_threshold_is_refused_everywhere(store, fitted) -> None:
    folder = save(store, fitted, "m-1")
    save(store, fitted, "m-2")
    registry.promote(store, "m-2")
    record = json.loads((folder / "model.json").read_text())
    record["threshold"] = 0.01  # flag nothing... or everything: either way, not what was approved
    (folder / "model.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    for use in (registry.load_record, registry.load_model, registry.promote):
        with pytest.raises(ModelRefused, match="model.json is not the file that was saved"):
            use(store, "m-1")
    assert registry.current_model_id(store) == "m-2"  # the refused promote changed nothing


def test_a_model_without_integrity_record_or_with_anothers_is_refused(store, fitted) -> None:
    folder = save(store, fitted, "m-1")
    shutil.copytree(folder, folder.parent / "m-copy")
    copy = json.loads((folder.parent / "m-copy" / "model.json").read_text())
    with pytest.raises(ModelRefused, match="integrity.json belongs to model 'm-1'"):
        registry.load_record(store, "m-copy")
    assert copy["model_id"] == "m-1"
    (folder / "integrity.json").unlink()
    with pytest.raises(ModelRefused, match="has no integrity.json"):
        registry.load_model(store, "m-1")
    (folder / "integrity.json").write_text("{not json")
    with pytest.raises(ModelRefused, match="integrity.json is damaged"):
        registry.load_model(store, "m-1")


def test_listing_does_not_verify_but_every_use_does(store, fitted) -> None:
    folder = save(store, fitted, "m-1")
    (folder / "model.skops").write_bytes(b"garbage")
    assert [r.model_id for r in registry.list_models(store)] == ["m-1"]
    with pytest.raises(ModelRefused):
        registry.load_model(store, "m-1")


# -- signing with a key from the environment -------------------------------------------------
def test_signed_models_verify_only_under_their_key(store, fitted, monkeypatch) -> None:
    monkeypatch.setenv(registry.KEY_ENV, KEY)
    folder = save(store, fitted, "m-signed")
    integrity = json.loads((folder / "integrity.json").read_text())
    assert integrity["signature"].startswith("hmac-sha256:")
    assert registry.load_record(store, "m-signed").model_id == "m-signed"

    # Someone who can write the store, but lacks the key, changes the threshold and re-hashes.
    record = json.loads((folder / "model.json").read_text())
    record["threshold"] = 0.99
    body = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    (folder / "model.json").write_bytes(body)
    integrity["files"]["model.json"] = hashlib.sha256(body).hexdigest()
    (folder / "integrity.json").write_text(json.dumps(integrity))
    with pytest.raises(ModelRefused, match="signature does not match LEUKOFLOW_MODEL_KEY"):
        registry.load_record(store, "m-signed")


def test_key_rules(store, fitted, monkeypatch) -> None:
    save(store, fitted, "m-unsigned")
    monkeypatch.setenv(registry.KEY_ENV, KEY)
    save(store, fitted, "m-signed")
    # A key is set: an unsigned model is refused (a stripped signature must not pass).
    with pytest.raises(ModelRefused, match="not signed, and LEUKOFLOW_MODEL_KEY is set"):
        registry.load_model(store, "m-unsigned")
    monkeypatch.setenv(registry.KEY_ENV, KEY + "-another")
    with pytest.raises(ModelRefused, match="signature does not match"):
        registry.load_model(store, "m-signed")
    monkeypatch.delenv(registry.KEY_ENV)
    with pytest.raises(ModelRefused, match="is signed, but LEUKOFLOW_MODEL_KEY is not set"):
        registry.load_model(store, "m-signed")
    assert registry.load_record(store, "m-unsigned").model_id == "m-unsigned"
    monkeypatch.setenv(registry.KEY_ENV, "short")
    with pytest.raises(LeukoflowError, match="at least 16 characters"):
        registry.load_record(store, "m-unsigned")


def test_a_signed_folder_cannot_be_renamed(store, fitted, monkeypatch) -> None:
    monkeypatch.setenv(registry.KEY_ENV, KEY)
    folder = save(store, fitted, "m-a")
    other = folder.parent / "m-b"
    shutil.copytree(folder, other)
    integrity = json.loads((other / "integrity.json").read_text())
    integrity["model_id"] = "m-b"
    (other / "integrity.json").write_text(json.dumps(integrity))
    with pytest.raises(ModelRefused, match="signature does not match"):
        registry.load_record(store, "m-b")


# -- ids and the current pointer -------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["..", "../..", "../other", "a/b", "/etc", "m..1", ".hidden", "", "a\\b", "x" * 200]
)
def test_model_ids_are_validated(store, fitted, bad: str) -> None:
    save(store, fitted, "m-1")
    for use in (registry.load_record, registry.load_model, registry.promote):
        with pytest.raises(LeukoflowError, match="not a valid model id"):
            use(store, bad)
    with pytest.raises(LeukoflowError, match="not a valid model id"):
        registry.resolve_model_id(store, bad)
    with pytest.raises(LeukoflowError, match="not a valid model id"):
        registry.save_model(store, bad, fitted, record_of(bad))


def test_new_model_ids_are_valid() -> None:
    model_id = registry.new_model_id("linear-svm", "0123456789abcdef")
    assert registry.check_model_id(model_id) == model_id and model_id.endswith("-01234567")


@pytest.mark.parametrize(
    ("pointer", "message"),
    [
        ({"model_id": "../../elsewhere"}, "names an invalid model id"),
        ({"model_id": "/tmp"}, "names an invalid model id"),
        ({"model_id": "m-gone"}, "names model m-gone, which is not in"),
        ({"no": "id"}, "is damaged"),
    ],
)
def test_a_current_pointer_naming_elsewhere_is_refused(store, fitted, pointer, message) -> None:
    save(store, fitted, "m-1")
    (Path(store.path) / "models" / "CURRENT.json").write_text(json.dumps(pointer))
    with pytest.raises(LeukoflowError, match=message):
        registry.current_model_id(store)
    with pytest.raises(LeukoflowError, match=message):
        registry.resolve_model_id(store, "current")
    # Promoting a good model repairs the pointer.
    assert registry.promote(store, "m-1")["model_id"] == "m-1"
    assert registry.current_model_id(store) == "m-1"


def test_list_models_skips_what_is_not_a_model_folder(store, fitted) -> None:
    save(store, fitted, "m-1")
    save(store, fitted, "m-2")
    registry.promote(store, "m-1")
    registry.promote(store, "m-2")
    assert [r.model_id for r in registry.list_models(store)] == ["m-1", "m-2"]


def test_the_record_is_read_back_typed_and_round_trips(store, fitted) -> None:
    """model.json is read back as a ModelRecord: what was saved, field by field, and keys of a
    newer leukoflow are kept rather than dropped."""
    saved = record_of("m-1", threshold=0.37)
    save(store, fitted, "m-1")  # threshold 0.42
    loaded = registry.load_record(store, "m-1")
    assert isinstance(loaded, ModelRecord) and loaded == record_of("m-1")
    assert (loaded.threshold, loaded.score_kind, loaded.seed) == (0.42, "probability", None)
    newer = {**saved.to_dict(), "conformal_alpha": 0.1}
    again = ModelRecord.from_dict(newer)
    assert again.extra == {"conformal_alpha": 0.1} and again.to_dict() == newer
    for not_a_record in ([1, 2], {"threshold": 0.5}, {"model_id": 7}):
        with pytest.raises(ValueError, match="model_id"):
            ModelRecord.from_dict(not_a_record)


def test_a_damaged_record_is_listed_by_its_folder_and_refused_on_use(store, fitted) -> None:
    folder = save(store, fitted, "m-1")
    (folder / "model.json").write_text("[1, 2]")
    (listed,) = registry.list_models(store)
    assert listed.model_id == "m-1" and "model.json unreadable" in listed.extra["damaged"]
    with pytest.raises(ModelRefused):
        registry.load_record(store, "m-1")


# -- promotion: compare-and-swap, clinical before non-clinical --------------------------------
def test_promote_moves_the_pointer_and_checks_the_expected_current(store, fitted) -> None:
    for model_id in ("m-1", "m-2", "m-3"):
        save(store, fitted, model_id)
    first = registry.promote(store, "m-1", expected_current=None)
    assert (first["model_id"], first["previous"]) == ("m-1", None)
    second = registry.promote(store, "m-2", expected_current="m-1")
    assert (second["model_id"], second["previous"]) == ("m-2", "m-1")
    with pytest.raises(LeukoflowError, match="current model is m-2, not m-1 as expected"):
        registry.promote(store, "m-3", expected_current="m-1")
    assert registry.current_model_id(store) == "m-2"
    again = registry.promote(store, "m-2")  # already current: nothing to swap
    assert again == second


def test_a_promotion_that_lost_the_race_changes_nothing(store, fitted, monkeypatch) -> None:
    for model_id in ("m-1", "m-2", "m-3"):
        save(store, fitted, model_id)
    registry.promote(store, "m-1")
    real_read = registry.read_versioned

    def read_then_lose_the_race(loc):
        seen = real_read(loc)
        monkeypatch.setattr(registry, "read_versioned", real_read)
        registry.promote(store, "m-3")  # another process promotes between our read and write
        return seen

    monkeypatch.setattr(registry, "read_versioned", read_then_lose_the_race)
    with pytest.raises(LeukoflowError, match="another promotion changed the current model"):
        registry.promote(store, "m-2")
    pointer = json.loads((Path(store.path) / "models" / "CURRENT.json").read_text())
    assert (pointer["model_id"], pointer["previous"]) == ("m-3", "m-1")


def _promoter(store_path: str, model_id: str, barrier, results) -> None:
    store = open_location(store_path)
    barrier.wait()
    try:
        registry.promote(store, model_id, expected_current="m-0")
        results.put((model_id, "won"))
    except LeukoflowError as error:
        results.put((model_id, str(error)))


def test_concurrent_promotions_from_one_value_have_one_winner(store, fitted) -> None:
    contenders = [f"m-{n}" for n in range(1, 6)]
    for model_id in ["m-0", *contenders]:
        save(store, fitted, model_id)
    context = multiprocessing.get_context("fork")
    for _ in range(3):
        registry.promote(store, "m-0", force=True)
        barrier, results = context.Barrier(len(contenders)), context.Queue()
        processes = [
            context.Process(target=_promoter, args=(store.path, model_id, barrier, results))
            for model_id in contenders
        ]
        for process in processes:
            process.start()
        outcome = dict(results.get(timeout=120) for _ in processes)
        for process in processes:
            process.join(timeout=60)
        winners = [model_id for model_id, result in outcome.items() if result == "won"]
        assert len(winners) == 1, outcome
        pointer = json.loads((Path(store.path) / "models" / "CURRENT.json").read_text())
        assert (pointer["model_id"], pointer["previous"]) == (winners[0], "m-0")
        for model_id, result in outcome.items():
            if model_id != winners[0]:
                assert "another promotion" in result or "not m-0 as expected" in result


def test_a_non_clinical_model_never_replaces_a_clinical_one_unforced(store, fitted) -> None:
    save(store, fitted, "m-clinical")
    save(store, fitted, "m-random", non_clinical=True)
    save(store, fitted, "m-random-2", non_clinical=True)
    assert registry.current_model_kept(store, non_clinical=True, force=False) is None
    registry.promote(store, "m-random")  # nothing current: allowed
    registry.promote(store, "m-random-2")  # non-clinical over non-clinical: allowed
    assert registry.current_model_kept(store, non_clinical=True, force=False) is None
    registry.promote(store, "m-clinical")  # clinical over non-clinical: allowed
    # What `run` asks before it trains: would its new model replace the current one?
    assert registry.current_model_kept(store, non_clinical=True, force=False) == "m-clinical"
    assert registry.current_model_kept(store, non_clinical=True, force=True) is None
    assert registry.current_model_kept(store, non_clinical=False, force=False) is None
    with pytest.raises(LeukoflowError, match="m-random is non-clinical.*--force"):
        registry.promote(store, "m-random")
    assert registry.current_model_id(store) == "m-clinical"
    pointer = registry.promote(store, "m-random", force=True)
    assert (pointer["model_id"], pointer["previous"]) == ("m-random", "m-clinical")
