"""Configuration errors through the real command line: exit 2, one clear line, no traceback.

Unknown backbone, classifier and split, an image size a backbone refuses, bad --labels, missing
ImageNet weights, a missing IMAGES folder and a one-class training set are in tests/cli/; this
file adds the rest of the list in docs/reliability.md. Each case calls the CLI's entry point in
this process (the answer is the product's, not the interpreter's); that a separate process
shows the same one line with the same exit status is tests/cli/test_main.py's
`test_the_script_keeps_the_conventions`.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
from cli import leukoflow_here
from PIL import Image

from leukoflow.features.backbones import BACKBONES
from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_predictions

from .harness import SMALL_RUN, assert_one_line_error

# Some cases get as far as the run's flow: it reports to the run's Prefect server.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture
def closed_endpoint():
    """http://127.0.0.1:PORT where nothing listens: the port is bound here and never listened
    on, so connections are refused and no other process can take the port meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture
def env(monkeypatch):
    """Set variables for this test's CLI call; no AWS setting of the developer's leaks in."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)

    def setenv(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return setenv


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """8 tiny good cells of 4 subjects: enough for every check that precedes extraction."""
    root = tmp_path_factory.mktemp("cells")
    return make_synthetic_dataset(root, n_subjects=4, cells_per_subject=2, image_side=32)


def run(capsys, images, store, *extra):
    return leukoflow_here(capsys, "run", images, "--store", store, *SMALL_RUN, *extra)


def test_an_s3_endpoint_that_cannot_be_reached(capsys, env, cells, closed_endpoint):
    env(AWS_ENDPOINT_URL=closed_endpoint, LEUKOFLOW_S3_MAX_ATTEMPTS="2",
        AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")  # fmt: skip
    result = run(capsys, cells, "s3://bucket/store")
    assert_one_line_error(result, "cannot reach the store s3://bucket/store", closed_endpoint)


def test_an_s3_bucket_that_does_not_exist(capsys, env, cells, s3_endpoint):
    env(**s3_endpoint.env)
    result = run(capsys, cells, "s3://no-such-bucket/store")
    assert_one_line_error(result, "s3://no-such-bucket/store does not exist: no such bucket")


def test_a_local_store_that_cannot_be_created(capsys, cells, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run(capsys, cells, tmp_path / "a-file" / "store")
    assert_one_line_error(result, "cannot use the store", "Not a directory")


def test_a_retry_budget_that_is_not_a_number(capsys, env, cells):
    env(LEUKOFLOW_S3_MAX_ATTEMPTS="lots")
    result = run(capsys, cells, "s3://bucket/store")
    assert_one_line_error(result, "LEUKOFLOW_S3_MAX_ATTEMPTS", "'lots'")


def test_weights_with_the_wrong_md5(capsys, cells, tmp_path):
    spec = BACKBONES["vgg16"]
    (tmp_path / spec.weights_file).write_bytes(b"not the keras file")
    result = leukoflow_here(
        capsys, "run", cells, "--store", tmp_path / "store", "--backbones", "vgg16",
        "--image-size", "32", "--weights", "imagenet", "--weights-dir", tmp_path,
    )  # fmt: skip
    assert_one_line_error(result, spec.weights_file, f"expected {spec.weights_md5}")
    assert not (tmp_path / "store" / "catalog").exists()  # refused before any work


def test_a_folder_without_images(capsys, tmp_path):
    (tmp_path / "images" / "all").mkdir(parents=True)
    (tmp_path / "images" / "all" / "notes.txt").write_text("nothing here")
    result = run(capsys, tmp_path / "images", tmp_path / "store")
    assert_one_line_error(result, "no images found under")


def test_a_dataset_where_no_image_is_usable(capsys, tmp_path):
    (tmp_path / "images" / "all").mkdir(parents=True)
    (tmp_path / "images" / "hem").mkdir()
    (tmp_path / "images" / "all" / "empty.bmp").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "hem" / "tiny.bmp")
    result = run(capsys, tmp_path / "images", tmp_path / "store")
    assert_one_line_error(result, "no labelled images to train on")
    # Stopped after cataloguing, before any model was started: no vector was written.
    assert (tmp_path / "store" / "catalog").exists()
    assert not (tmp_path / "store" / "features").exists()


def test_one_subject_per_class_under_a_subject_split(capsys, tmp_path):
    images = make_synthetic_dataset(tmp_path / "images", n_subjects=2, cells_per_subject=6,
                                    image_side=32)  # fmt: skip
    result = run(capsys, images, tmp_path / "store", "--split", "subject")
    assert_one_line_error(result, "--split subject needs at least 2 subjects per class")
    assert (tmp_path / "store" / "catalog").exists()
    assert not (tmp_path / "store" / "features").exists()


# -- `leukoflow score`, against the store the bad-input runs trained a model in --------------
@pytest.fixture
def scored_store(messy_runs, tmp_path):
    """A private copy of the messy runs' store (a vgg16 32 px model is current)."""
    store = tmp_path / "store"
    shutil.copytree(messy_runs.store, store)
    return store


def test_score_an_inbox_that_does_not_exist(capsys, scored_store, tmp_path):
    result = leukoflow_here(capsys, "score", tmp_path / "no-inbox", "--store", scored_store)
    assert_one_line_error(result, "no-inbox", "does not exist")


def test_score_with_a_model_whose_feature_recipe_does_not_match(capsys, scored_store, cells):
    result = leukoflow_here(
        capsys, "score", cells, "--store", scored_store, "--backbones", "vgg19",
        "--image-size", "32",
    )  # fmt: skip
    assert_one_line_error(result, "backbones vgg16", "asks for vgg19", "different feature recipe")
    assert read_predictions(open_location(str(scored_store))).num_rows == 0  # nothing scored
