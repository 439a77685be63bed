"""Configuration errors through the real command line: exit 2, one clear line, no traceback.

Unknown backbone, classifier and split, an image size a backbone refuses, bad --labels, missing
ImageNet weights, a missing IMAGES folder and a one-class training set are in tests/test_cli.py;
this file adds the rest of the list in docs/reliability.md.
"""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from leukoflow.tasks.backbones import BACKBONES
from leukoflow.tasks.synthetic import make_synthetic_dataset

from .harness import SMALL_RUN, assert_one_line_error, leukoflow

pytestmark = pytest.mark.integration


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """8 tiny good cells of 4 subjects: enough for every check that precedes extraction."""
    root = tmp_path_factory.mktemp("cells")
    return make_synthetic_dataset(root, n_subjects=4, cells_per_subject=2, image_side=32)


def run(cli, images, store, *extra, env=None):
    return leukoflow("run", images, "--store", store, *SMALL_RUN, *extra,
                     env=cli.env(**(env or {})))  # fmt: skip


def test_an_s3_endpoint_that_cannot_be_reached(cli, cells):
    closed = f"http://127.0.0.1:{free_port()}"
    result = run(
        cli, cells, "s3://bucket/store",
        env={"AWS_ENDPOINT_URL": closed, "LEUKOFLOW_S3_MAX_ATTEMPTS": "2",
             "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
    )  # fmt: skip
    assert_one_line_error(result, "cannot reach the store s3://bucket/store", closed)


def test_an_s3_bucket_that_does_not_exist(cli, cells, s3_endpoint):
    result = run(cli, cells, "s3://no-such-bucket/store", env=s3_endpoint.env)
    assert_one_line_error(result, "s3://no-such-bucket/store does not exist: no such bucket")


def test_a_local_store_that_cannot_be_created(cli, cells, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = run(cli, cells, tmp_path / "a-file" / "store")
    assert_one_line_error(result, "cannot use the store", "Not a directory")


def test_a_retry_budget_that_is_not_a_number(cli, cells):
    result = run(cli, cells, "s3://bucket/store", env={"LEUKOFLOW_S3_MAX_ATTEMPTS": "lots"})
    assert_one_line_error(result, "LEUKOFLOW_S3_MAX_ATTEMPTS")


def test_weights_with_the_wrong_md5(cli, cells, tmp_path):
    spec = BACKBONES["vgg16"]
    (tmp_path / spec.weights_file).write_bytes(b"not the keras file")
    result = leukoflow(
        "run", cells, "--store", tmp_path / "store", "--backbones", "vgg16",
        "--image-size", "32", "--weights", "imagenet", "--weights-dir", tmp_path,
        env=cli.env(),
    )  # fmt: skip
    assert_one_line_error(result, spec.weights_file, f"expected {spec.weights_md5}")
    assert not (tmp_path / "store" / "catalog").exists()  # refused before any work


def test_a_folder_without_images(cli, tmp_path):
    (tmp_path / "images" / "all").mkdir(parents=True)
    (tmp_path / "images" / "all" / "notes.txt").write_text("nothing here")
    result = run(cli, tmp_path / "images", tmp_path / "store")
    assert_one_line_error(result, "no images found under")


def test_a_dataset_where_no_image_is_usable(cli, tmp_path):
    (tmp_path / "images" / "all").mkdir(parents=True)
    (tmp_path / "images" / "hem").mkdir()
    (tmp_path / "images" / "all" / "empty.bmp").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "hem" / "tiny.bmp")
    result = run(cli, tmp_path / "images", tmp_path / "store")
    assert_one_line_error(result, "no labelled images to train on")
    assert "extract" not in result.stderr  # stopped before any model was started


def test_one_subject_per_class_under_a_subject_split(cli, tmp_path):
    images = make_synthetic_dataset(tmp_path / "images", n_subjects=2, cells_per_subject=6,
                                    image_side=32)  # fmt: skip
    result = run(cli, images, tmp_path / "store", "--split", "subject")
    assert_one_line_error(result, "--split subject needs at least 2 subjects per class")
    assert "extract" not in result.stderr


# -- `leukoflow score`, against the store the bad-input runs trained a model in --------------
@pytest.fixture
def scored_store(messy_runs, tmp_path):
    """A private copy of the messy runs' store (a vgg16 32 px model is current)."""
    store = tmp_path / "store"
    shutil.copytree(messy_runs.store, store)
    return store


def test_score_an_inbox_that_does_not_exist(cli, scored_store, tmp_path):
    result = leukoflow("score", tmp_path / "no-inbox", "--store", scored_store,
                       env=cli.env())  # fmt: skip
    assert_one_line_error(result, "no-inbox", "does not exist")


def test_score_with_a_model_whose_feature_recipe_does_not_match(cli, scored_store, cells):
    result = leukoflow(
        "score", cells, "--store", scored_store, "--backbones", "vgg19", "--image-size", "32",
        env=cli.env(),
    )  # fmt: skip
    assert_one_line_error(result, "backbones vgg16", "asks for vgg19", "different feature recipe")
