"""The backbone registry and the offline ImageNet-weights path (with a weights file made here)."""

import dataclasses

import h5py
import numpy as np
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb
from leukoflow.features.extract import Featuriser


def test_the_paper_trio_is_the_default_and_sums_to_3072():
    assert bb.DEFAULT_BACKBONES == ("vgg16", "densenet121", "inception_resnet_v2")
    assert sum(bb.BACKBONES[n].feature_dim for n in bb.DEFAULT_BACKBONES) == 3072
    cnns = {n for n, spec in bb.BACKBONES.items() if not spec.full_resolution}
    assert cnns == {
        "vgg16", "vgg19", "resnet101", "mobilenet_v2", "densenet121", "inception_resnet_v2"
    }  # fmt: skip
    assert set(bb.BACKBONES) - cnns == {"color_morphology"}


def test_each_backbone_uses_its_own_preprocessing():
    pixels = np.full((1, 4, 4, 3), 255.0, np.float32)
    vgg = bb.preprocess(bb.BACKBONES["vgg16"], pixels)  # caffe: BGR, ImageNet means removed
    inception = bb.preprocess(bb.BACKBONES["inception_resnet_v2"], pixels)  # tf: -1..1
    densenet = bb.preprocess(bb.BACKBONES["densenet121"], pixels)  # torch: /255, mean/std
    np.testing.assert_allclose(vgg[0, 0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68], 1e-4)
    np.testing.assert_allclose(inception[0, 0, 0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(
        densenet[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], 1e-5
    )
    assert pixels.max() == 255.0  # the caller's batch is shared by backbones: never modified


@pytest.mark.parametrize(
    ("text", "message"),
    [("vgg16,alexnet", "unknown backbone alexnet"), ("vgg16,vgg16", "listed twice"), ("", "no")],
)
def test_bad_backbone_lists_are_usage_errors(text, message):
    with pytest.raises(LeukoflowError, match=message):
        bb.parse_backbones(text)


def test_backbone_order_is_kept():
    assert bb.parse_backbones("densenet121, vgg16") == ["densenet121", "vgg16"]


def test_image_size_below_a_backbones_minimum_is_refused():
    bb.check_image_size(["vgg16"], 32)
    with pytest.raises(LeukoflowError, match="inception_resnet_v2 accepts"):
        bb.check_image_size(["vgg16", "inception_resnet_v2"], 64)


def test_missing_weights_name_the_file_folder_md5_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    choice = bb.parse_weights("imagenet", None, seed=0)
    with pytest.raises(LeukoflowError) as error:
        bb.weights_id(bb.BACKBONES["vgg16"], choice)
    message = str(error.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "models") in message
    assert "6d6bbae143d832006294945121d1f1fc" in message
    assert "--weights none" in message and "\n" not in message


def test_weights_with_the_wrong_md5_are_refused(tmp_path):
    (tmp_path / bb.BACKBONES["vgg16"].weights_file).write_bytes(b"not the weights")
    with pytest.raises(LeukoflowError, match="expected 6d6bbae143d832006294945121d1f1fc"):
        bb.weights_id(bb.BACKBONES["vgg16"], bb.parse_weights(str(tmp_path), None, 0))


def _write_notop_file(path, spec, image_size, seed):
    """Save a model's weights in the legacy Keras .h5 layout the real notop files use."""
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    model = bb.build_model(spec, image_size, None, seed)
    with h5py.File(path, "w") as handle:
        save_weights_to_hdf5_group(handle, model)
    return model


def test_imagenet_path_loads_a_checked_file_from_keras_home(tmp_path, monkeypatch):
    """Offline stand-in for ImageNet: a file made here, its MD5 registered in place of Keras'."""
    spec = bb.BACKBONES["vgg16"]
    (tmp_path / "models").mkdir()
    weights_path = tmp_path / "models" / spec.weights_file
    source = _write_notop_file(weights_path, spec, 32, seed=7)
    spec = dataclasses.replace(spec, weights_md5=bb.file_md5(weights_path))
    monkeypatch.setitem(bb.BACKBONES, "vgg16", spec)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    choice = bb.parse_weights("imagenet", None, seed=0)
    assert bb.weights_id(spec, choice) == f"imagenet-{spec.weights_md5[:12]}"
    featuriser = Featuriser(spec, 32, choice)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    expected = source.predict_on_batch(bb.preprocess(spec, pixels))
    np.testing.assert_allclose(featuriser(pixels), expected, rtol=1e-5, atol=1e-5)
    random_init = Featuriser(spec, 32, bb.parse_weights("none", None, seed=0))
    assert not np.allclose(random_init(pixels), expected)


def test_random_init_is_reproducible_from_the_seed():
    spec = bb.BACKBONES["vgg16"]
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    first = Featuriser(spec, 32, bb.WeightsChoice("none", seed=3))(pixels)
    again = Featuriser(spec, 32, bb.WeightsChoice("none", seed=3))(pixels)
    other = Featuriser(spec, 32, bb.WeightsChoice("none", seed=4))(pixels)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert bb.weights_id(spec, bb.WeightsChoice("none", seed=3)) == "random-seed3"


@pytest.mark.parametrize(
    ("gpus", "flags", "expected"),
    [
        ([], set(), "fp32"),  # this machine: AVX2 only
        ([], {"amx_bf16", "avx2"}, "bf16"),
        ([], {"avx512_bf16"}, "bf16"),
        ([8.0], set(), "bf16"),  # A100
        ([9.0, 9.0], set(), "bf16"),  # H100s
        ([7.0], {"amx_bf16"}, "fp32"),  # V100: the models run there, and it has no bf16 cores
        ([8.6, 7.5], set(), "fp32"),  # one older card among the visible ones
    ],
)
def test_auto_precision_is_bf16_only_where_the_hardware_runs_it(
    monkeypatch, caplog, gpus, flags, expected
):
    monkeypatch.setattr(bb, "gpu_compute_capabilities", lambda: gpus)
    monkeypatch.setattr(bb, "cpu_flags", lambda: flags)
    with caplog.at_level("INFO", logger="leukoflow.backbones"):
        assert bb.native_precision() == expected
    assert f"precision auto: {expected}" in caplog.text  # the choice is logged


def test_hidden_gpus_count_as_none(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert bb.gpu_compute_capabilities() == []


def test_bf16_ids_never_equal_fp32_ones():
    spec, choice = bb.BACKBONES["vgg16"], bb.WeightsChoice("none", seed=2)
    assert bb.weights_id(spec, choice) == "random-seed2"
    assert bb.weights_id(spec, choice, "bf16") == "random-seed2+bf16"
