"""The feature recipe and the compute setting: validated once, immutable, the one source of the
keys stored vectors carry, and rebuilt from a model's record only where it can be reproduced."""

import dataclasses

import pytest
from native_bf16 import native_precision
from pydantic import TypeAdapter

from leukoflow.errors import LeukoflowError
from leukoflow.recipe import Compute, FeatureRecipe, recipe_from_record
from leukoflow.store.records import ModelRecord


def record(**changes) -> ModelRecord:
    recipe = {
        "backbones": ["vgg16", "densenet121"],
        "dims": [512, 1024],
        "feature_dim": 1536,
        "weights": "none",
        "weights_ids": {"vgg16": "random-seed0", "densenet121": "random-seed0"},
        "image_size": 32,
    }
    recipe.update(changes)
    return ModelRecord("m1", feature_recipe=recipe, seed=0, score_kind="probability")


def test_a_recipe_normalises_user_input_and_keys_vectors_by_each_backbones_size():
    recipe = FeatureRecipe("vgg16, color_morphology", weights="none", image_size=64, seed=3)
    assert recipe.backbones == ("vgg16", "color_morphology")
    # The full-resolution extractor's vectors are keyed 0 whatever the image size: the copy of
    # this rule that once lived in the sweep keyed them by 64 and re-extracted every night.
    assert recipe.vector_key("vgg16") == ("random-seed3", 64)
    cm_version = recipe.weights_ids["color_morphology"]
    assert recipe.vector_key("color_morphology") == (cm_version, 0)
    assert recipe.non_clinical and recipe.dims[0] == 512
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.image_size = 224


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"backbones": ("alexnet",)}, "unknown backbone alexnet"),
        ({"backbones": ("vgg16", "vgg16")}, "listed twice"),
        ({"backbones": ("vgg16",), "image_size": 8}, "--image-size 8"),
        ({"weights": "/no/such/folder"}, "--weights must be"),
        ({"precision": "fp8"}, "--precision"),
    ],
)
def test_bad_recipes_are_refused_when_built(kwargs, words):
    with pytest.raises(LeukoflowError, match=words.replace("-", "\\-")):
        FeatureRecipe(**kwargs)


def test_precision_keys_bf16_vectors_apart():
    fp32 = FeatureRecipe(("vgg16", "color_morphology"), weights="none")
    bf16 = dataclasses.replace(fp32, precision="bf16")
    assert fp32.weights_ids["vgg16"] == "random-seed0"  # every vector stored before bf16
    assert bf16.weights_ids["vgg16"] == "random-seed0+bf16"
    assert bf16.weights_ids["color_morphology"] == fp32.weights_ids["color_morphology"]


def test_auto_precision_is_what_this_machine_runs_natively():
    expected = native_precision()  # read from /proc/cpuinfo (and nvidia-smi) by the test
    recipe = FeatureRecipe(("vgg16",), weights="none", precision="auto")
    assert recipe.precision == expected
    suffix = "+bf16" if expected == "bf16" else ""
    assert recipe.weights_ids["vgg16"] == f"random-seed0{suffix}"


def test_recipes_and_compute_settings_are_prefect_parameters():
    """Flows take them typed; a deployment passes them as dicts (pydantic validates)."""
    recipe = TypeAdapter(FeatureRecipe).validate_python(
        {"backbones": ["vgg16"], "weights": "none", "image_size": 48}
    )
    assert recipe == FeatureRecipe(("vgg16",), weights="none", image_size=48)
    with pytest.raises(LeukoflowError):
        TypeAdapter(FeatureRecipe).validate_python({"backbones": ["nope"]})
    compute = TypeAdapter(Compute).validate_python({"batch_size": 8, "gpu_share": 0.5})
    assert compute == Compute(batch_size=8, gpu_share=0.5)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"gpu_share": 1.5}, "--gpu-share"),
        ({"gpu_share": 0}, "--gpu-share"),
        ({"actor_cpus": -1}, "--actor-cpus"),
        ({"batch_size": 0}, "--batch-size"),
        ({"batch_timeout_s": 0}, "--batch-timeout"),
    ],
)
def test_unschedulable_compute_settings_are_refused(kwargs, words):
    with pytest.raises(LeukoflowError, match=words.replace("-", "\\-")):
        Compute(**kwargs)


def test_a_models_recipe_round_trips_through_its_record():
    recipe = FeatureRecipe(("vgg16", "densenet121"), weights="none", image_size=32)
    again = recipe_from_record(ModelRecord("m", feature_recipe=recipe.to_record()))
    assert again == recipe and again.weights_ids == recipe.weights_ids


def test_a_record_saved_before_precision_existed_reads_as_fp32_with_its_seed():
    recipe = recipe_from_record(record())
    assert recipe.precision == "fp32" and recipe.seed == 0
    assert recipe.weights_id == "random-seed0,random-seed0" and recipe.feature_dim == 1536


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"dims": [1024, 512]}, "sizes [1024, 512]"),  # concatenated in another order
        ({"backbones": ["vgg16", "alexnet"]}, "unknown backbone alexnet"),
        ({"image_size": 8}, "--image-size 8"),
        ({"weights": "someday"}, "unknown weights kind"),
        ({"weights_ids": {"vgg16": "random-seed0"}}, "lacks weights ids"),
        ({"weights_ids": {"vgg16": "random-seed7", "densenet121": "random-seed0"}}, "random-seed7"),
        ({"precision": "fp8"}, "unknown precision"),
    ],
)
def test_a_recipe_this_code_cannot_reproduce_is_refused(changes, words):
    with pytest.raises(LeukoflowError) as error:
        recipe_from_record(record(**changes))
    assert words in str(error.value)


def test_no_recipe_at_all_is_refused():
    with pytest.raises(LeukoflowError, match="no usable feature recipe"):
        recipe_from_record(ModelRecord("old"))
