"""The command line as a user meets it: a real subprocess, exit codes, stderr and --json."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def leukoflow(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "leukoflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_usage_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "leukoflow: error" in line]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert word in error_lines[0]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--backbones", "vgg16,alexnet"], ["unknown backbone alexnet"]),
        (["--classifier", "xgboost"], ["unknown classifier"]),
        (["--split", "time"], ["unknown split"]),
        (["--image-size", "40", "--backbones", "inception_resnet_v2"], ["accepts (>= 75)"]),
        (["--labels", "blast"], ["--labels"]),
    ],
)
def test_configuration_errors_exit_2_with_one_line(tmp_path, synthetic_images, extra, words):
    result = leukoflow(
        "run", str(synthetic_images), "--store", str(tmp_path), "--weights", "none", *extra
    )
    assert_usage_error(result, *words)


@pytest.mark.parametrize(
    "command",
    [["run", "--weights", "none"], ["backfill", "--dataset", "d", "--weights", "none"], ["score"]],
)
def test_every_extracting_command_refuses_an_unschedulable_actor_share(
    tmp_path, synthetic_images, command
):
    name, *options = command
    base = [name, str(synthetic_images), "--store", str(tmp_path / "store"), *options]
    assert_usage_error(leukoflow(*base, "--gpu-share", "1.5"), "--gpu-share", "1.5")
    assert_usage_error(leukoflow(*base, "--actor-cpus", "0"), "--actor-cpus")


def test_missing_imagenet_weights_exit_2_naming_the_file(tmp_path, synthetic_images):
    result = leukoflow(
        "run", str(synthetic_images), "--store", str(tmp_path), "--backbones", "densenet121",
        env={"KERAS_HOME": str(tmp_path / "empty")},
    )  # fmt: skip
    assert_usage_error(
        result, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", "--weights none"
    )


def test_missing_images_folder_exits_2(tmp_path):
    result = leukoflow("run", str(tmp_path / "nope"), "--store", str(tmp_path), "--weights", "none")
    assert_usage_error(result, "nope")


def test_one_class_only_exits_2_before_extraction(tmp_path, synthetic_images):
    result = leukoflow(
        "run", str(synthetic_images / "fold_0" / "all"), "--store", str(tmp_path / "s"),
        "--weights", "none", "--backbones", "vgg16", "--image-size", "32",
        "--labels", "fold_0=all",
    )  # fmt: skip
    assert_usage_error(result)
    assert "Traceback" not in result.stderr and "extract" not in result.stderr


def test_run_json_then_status(tmp_path, synthetic_images):
    store = tmp_path / "store"
    result = leukoflow(
        "run", str(synthetic_images), "--store", str(store), "--weights", "none",
        "--backbones", "vgg16", "--image-size", "32", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["counts"]["found"] == 24 and summary["feature_dim"] == 512
    assert summary["non_clinical"] is True and "NOT CLINICALLY" in summary["note"]
    assert 0 <= summary["metrics"]["accuracy"] <= 1
    assert os.path.exists(summary["paths"]["report_html"])

    status = leukoflow("status", "--store", str(store), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout.strip().splitlines()[-1])
    assert report["datasets"]["default"] == {
        "found": 24,
        "ok": 24,
        "quarantined": 0,
        "duplicate": 0,
    }
    assert report["features"]["vgg16"] == {"random-seed0@32px": 24}
    assert report["current_model"] == summary["model_id"]
