"""`leukoflow models list | show | promote` as a user meets it, and the registry beneath."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.learn import calibration, train
from leukoflow.store import registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import open_location

from . import leukoflow_here

LONG_BACKBONES = ["vgg16", "vgg19", "resnet101", "mobilenet_v2", "inception_resnet_v2"]


@pytest.fixture()
def cli(capsys):
    """The real entry point, in this process (a subprocess per call would mostly time imports)."""
    return lambda *args: leukoflow_here(capsys, *args)


def last_json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def fitted_record(model_id: str, accuracy: float, backbones=("vgg16",)) -> tuple:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    y = (x[:, 0] > 0).astype(int)
    folds = train.kfold(y, [None] * 40, n_folds=3)
    model = calibration.fit_calibrated("linear-svm", x, y, folds)
    record = ModelRecord.from_dict(
        {
            "model_id": model_id,
            "created_at": "2026-01-01T00:00:00+00:00",
            "dataset": "synthetic",
            "feature_recipe": {"backbones": list(backbones), "dims": [4], "image_size": 32},
            "classifier": "linear-svm",
            "score_kind": "probability",
            "threshold": 0.42,
            "target_sensitivity": 0.95,
            "split": "subject",
            "seed": 0,
            "n_train": 40,
            "training_fingerprint": train.fingerprint([str(i) for i in range(40)]),
            "code_version": registry.code_version(),
            "metrics": {"accuracy": accuracy, "f1": accuracy},
            "reference": {"feature_mean": [0.0] * 4},
            "test_image_ids": ["a", "b"],
        }
    )
    return model, record


@pytest.fixture()
def store(tmp_path):
    root = open_location(str(tmp_path))
    for model_id, accuracy in (("m-old", 0.8), ("m-new", 0.9)):
        registry.save_model(root, model_id, *fitted_record(model_id, accuracy))
    registry.promote(root, "m-old")
    return tmp_path


def test_list_marks_the_current_model(store, cli):
    listing = last_json(cli("models", "list", "--store", store, "--json"))
    assert [m["model_id"] for m in listing["models"]] == ["m-new", "m-old"]
    assert listing["current"] == "m-old"
    assert {m["model_id"]: m["current"] for m in listing["models"]} == {
        "m-new": False,
        "m-old": True,
    }
    text = cli("models", "list", "--store", store)
    assert text.returncode == 0 and "m-new" in text.stdout and "0.9000" in text.stdout


def test_show_prints_the_lineage_without_the_bulky_arrays(store, cli):
    shown = last_json(cli("models", "show", "current", "--store", store, "--json"))
    assert shown["model_id"] == "m-old" and shown["current"] is True
    assert shown["threshold"] == 0.42 and shown["score_kind"] == "probability"
    assert len(shown["training_fingerprint"]) == 64 and shown["code_version"]
    assert "reference" not in shown and shown["test_image_ids"].startswith("2 ids")
    text = cli("models", "show", "m-new", "--store", store)
    assert text.returncode == 0
    for words in ("Lineage", "training image set fingerprint", "code version", "threshold"):
        assert words in text.stdout


def test_promote_moves_the_pointer_and_remembers_the_previous_model(store, cli):
    pointer = last_json(cli("models", "promote", "m-new", "--store", store, "--json"))
    assert pointer["model_id"] == "m-new" and pointer["previous"] == "m-old"
    current = json.loads((store / "models" / "CURRENT.json").read_text())
    assert current["model_id"] == "m-new"
    assert not [p for p in (store / "models").iterdir() if p.name.startswith(".tmp")]


def test_an_unknown_model_exits_2_with_one_line(store, cli):
    result = cli("models", "show", "m-missing", "--store", store)
    assert result.returncode == 2
    assert result.stderr.strip() == f"leukoflow: error: no model m-missing in {store}"
    result = cli("models", "promote", "m-missing", "--store", store)
    assert result.returncode == 2
    assert result.stderr.strip() == f"leukoflow: error: no model m-missing in {store}"


@pytest.fixture()
def long_id_store(tmp_path):
    """A model with a real id (time, classifier, fingerprint) and wide columns beside it."""
    root = open_location(str(tmp_path))
    model_id = registry.new_model_id("linear-svm", "f" * 64)
    registry.save_model(root, model_id, *fitted_record(model_id, 0.9, LONG_BACKBONES))
    registry.promote(root, model_id)
    return tmp_path, model_id


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_model_ids_are_never_folded_at_80_columns(long_id_store, cli, monkeypatch, terminal):
    store, model_id = long_id_store
    # TTY_COMPATIBLE makes rich treat the captured stdout as an 80-column terminal.
    monkeypatch.setenv("COLUMNS", "80")
    if terminal:
        monkeypatch.setenv("TTY_COMPATIBLE", "1")
    else:
        monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    result = cli("models", "list", "--store", store)
    assert result.returncode == 0, result.stderr
    assert len(model_id) > 30 and re.search(rf"(^|\W){re.escape(model_id)}(\W|$)", result.stdout)
    if terminal:  # rendered for an 80-column terminal: the other columns give way, not the id
        assert max(len(line) for line in result.stdout.splitlines()) <= 80
    else:  # a pipe: nothing is wrapped, every row is one line
        rows = [line for line in result.stdout.splitlines() if model_id in line]
        assert len(rows) == 1 and "+".join(LONG_BACKBONES) in rows[0]


def test_model_folders_are_immutable(store):
    root = open_location(str(store))
    with pytest.raises(LeukoflowError, match="immutable"):
        registry.save_model(root, "m-new", *fitted_record("m-new", 0.5))
    _, record = registry.load_model(root, "m-new")
    assert record.metrics["accuracy"] == 0.9


def test_the_code_version_is_the_git_commit_or_else_the_package_version(monkeypatch):
    assert re.fullmatch(r"git:[0-9a-f]{40}(\+dirty)?", registry.code_version())

    def no_git(command):
        raise FileNotFoundError("git")

    monkeypatch.setattr(registry, "_git", no_git)
    assert registry.code_version() == "leukoflow==0.1.0"


def test_a_non_clinical_model_replaces_a_clinical_one_only_with_force(store, cli):
    root = open_location(str(store))
    model, record = fitted_record("m-random", 0.5)
    registry.save_model(root, "m-random", model, replace(record, non_clinical=True))
    refused = cli("models", "promote", "m-random", "--store", store)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert registry.current_model_id(root) == "m-old"
    pointer = last_json(cli("models", "promote", "m-random", "--store", store, "--force", "--json"))
    assert pointer["model_id"] == "m-random" and pointer["previous"] == "m-old"
    assert registry.current_model_id(root) == "m-random"
