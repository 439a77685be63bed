"""A signed model (LEUKOFLOW_MODEL_KEY) from the command line: `run` under the key saves an
HMAC-signed model; `models show`, `score` and `promote` use it only under that key. Without the
key, or with another one, each refuses it with one `leukoflow: refused:` line and exit 1 (the
model is not what this host can verify: the run failed, README "Models"); a key too short is a
configuration error (exit 2). A worker's side of it: tests/integration/test_prefect_deployments.py.

The commands run through the CLI's entry point in this process (a separate process's exit
status and one line: test_main.py::test_the_script_keeps_the_conventions).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from leukoflow.store import registry
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_predictions

from . import assert_user_error, leukoflow_here
from .test_models import fitted_record

pytestmark = pytest.mark.integration

KEY_ENV = "LEUKOFLOW_MODEL_KEY"
KEY = "signed-models-test-key-0001"
OTHER_KEY = "another-key-of-enough-length-0002"
RECIPE = ["--weights", "none", "--backbones", "vgg16", "--image-size", "32"]


def call(*args: object, key: str | None) -> subprocess.CompletedProcess:
    """`leukoflow ARGS` in this process with LEUKOFLOW_MODEL_KEY set to `key` (None: unset), for
    fixtures, where capsys is not available."""
    from leukoflow.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        if key is None:
            patch.delenv(KEY_ENV, raising=False)
        else:
            patch.setenv(KEY_ENV, key)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as done:
                code = done.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def signed(tmp_path_factory, synthetic_images, ray_local, prefect_harness):
    """`leukoflow run` under KEY: a store whose current model is signed, and an inbox of new
    files with the training cells' bytes (their vectors are in the store: no extraction)."""
    base = tmp_path_factory.mktemp("signed")
    store, inbox = base / "store", base / "inbox"
    trained = call("run", synthetic_images, "--store", store, *RECIPE, "--json", key=KEY)
    assert trained.returncode == 0, trained.stderr
    model_id = json.loads(trained.stdout.strip().splitlines()[-1])["model_id"]
    inbox.mkdir()
    cells = sorted(synthetic_images.rglob("*.bmp"))[:6]
    for cell in cells:
        shutil.copy(cell, inbox / cell.name)
    return {"store": store, "inbox": inbox, "model_id": model_id, "n_inbox": len(cells)}


@pytest.fixture
def key(monkeypatch):
    """Set (a string) or unset (None) LEUKOFLOW_MODEL_KEY for this test's commands."""

    def use(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(KEY_ENV, raising=False)
        else:
            monkeypatch.setenv(KEY_ENV, value)

    return use


def predictions_in(store: Path) -> int:
    return read_predictions(open_location(str(store))).num_rows


def assert_refused(result, *words: str) -> None:
    """Exit 1, no traceback, exactly one `leukoflow: refused: ...` line with `words` (a command
    that started a flow has Prefect's log lines around it, as in a process)."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("leukoflow:")]
    assert line.startswith("leukoflow: refused: model file refused: model "), line
    for word in words:
        assert word in line, (word, line)


def test_a_run_under_the_key_signs_its_model_with_an_hmac_of_its_digests(signed):
    folder = signed["store"] / "models" / signed["model_id"]
    integrity = json.loads((folder / "integrity.json").read_text())
    files = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
             for name in ("model.skops", "model.json")}  # fmt: skip
    assert integrity["model_id"] == signed["model_id"] and integrity["files"] == files
    # HMAC-SHA256 under the key of the id and the digests, computed here independently.
    message = json.dumps({"model_id": signed["model_id"], "files": files}, sort_keys=True)
    expected = hmac.new(KEY.encode(), message.encode(), hashlib.sha256).hexdigest()
    assert integrity["signature"] == f"hmac-sha256:{expected}"


def test_show_and_score_use_the_signed_model_under_its_key(signed, capsys, key):
    key(KEY)
    shown = leukoflow_here(capsys, "models", "show", "current", "--store", signed["store"],
                           "--json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.strip().splitlines()[-1])["model_id"] == signed["model_id"]
    before = predictions_in(signed["store"])
    scored = leukoflow_here(capsys, "score", signed["inbox"], "--store", signed["store"],
                            "--json")  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    summary = json.loads(scored.stdout.strip().splitlines()[-1])
    assert summary["model_id"] == signed["model_id"] and summary["outcome"] == "completed"
    # Scored with it: this sweep's rows are there, by this model (a second call of this test's
    # body would find them already scored: new = 0, so count from the summary).
    assert predictions_in(signed["store"]) == before + summary["counts"]["scored"]
    assert summary["counts"]["scored"] + summary["counts"]["skipped"] == signed["n_inbox"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, [f"is signed, but {KEY_ENV} is not set here"]),
        (OTHER_KEY, [f"its signature does not match {KEY_ENV}"]),
    ],
    ids=["without-the-key", "another-key"],
)
def test_without_its_key_the_signed_model_is_refused_with_one_line(
    signed, capsys, key, value, words
):
    key(value)
    store, model_id = signed["store"], signed["model_id"]
    before = predictions_in(store)
    for args in (
        ["models", "show", "current"],
        ["models", "promote", model_id],
        ["score", signed["inbox"]],
        ["explain", next(signed["inbox"].iterdir()), "--out", store.parent / "x.png"],
    ):
        assert_refused(leukoflow_here(capsys, *args, "--store", store), model_id, *words)
    assert predictions_in(store) == before  # nothing was scored with it
    assert not (store.parent / "x.png").exists()
    # A listing reads the records without using a model: it still works, naming the model.
    listing = leukoflow_here(capsys, "models", "list", "--store", store, "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout.strip().splitlines()[-1])["current"] == model_id


def test_a_key_too_short_is_a_configuration_error(signed, capsys, key):
    key("short-key")
    result = leukoflow_here(capsys, "models", "show", "current", "--store", signed["store"])
    assert_user_error(result, f"{KEY_ENV} must be at least 16 characters long")


def test_with_a_key_set_an_unsigned_model_is_refused(tmp_path, capsys, key):
    key(None)
    registry.save_model(
        open_location(str(tmp_path)), "m-unsigned", *fitted_record("m-unsigned", 0.9)
    )
    key(KEY)
    result = leukoflow_here(capsys, "models", "show", "m-unsigned", "--store", tmp_path)
    assert_refused(result, "m-unsigned", f"is not signed, and {KEY_ENV} is set")
