"""The shared options: defined once, stacked by every command that needs them, and built into
one FeatureRecipe and one Compute before any engine starts."""

import inspect
import re

import pytest
import typer
from typer.testing import CliRunner

from leukoflow import choices, recipe
from leukoflow.cli import app, options
from leukoflow.cli.options import COMPUTE, RECIPE, shared_options
from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb
from leukoflow.learn import experiments, train
from leukoflow.recipe import Compute, FeatureRecipe

from . import assert_user_error, leukoflow_here

RECIPE_OPTIONS = {"--backbones", "--weights", "--weights-dir", "--image-size", "--seed",
                  "--precision"}  # fmt: skip
COMPUTE_OPTIONS = {"--ray-address", "--batch-size", "--gpu-share", "--actor-cpus",
                   "--batch-timeout"}  # fmt: skip
EXTRACTING = ("run", "validate", "experiments", "backfill", "demo")


def command_options(*path: str) -> list[str]:
    """Every option name of the command at `path`, as click parsed the signature."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return [opt for param in command.params for opt in param.opts]


def option_choices(capsys, command_name: str, option: str) -> list[str]:
    """The choices the command's help offers for `option` (`--option <a|b|c>`)."""
    help_text = leukoflow_here(capsys, command_name, "--help").stdout
    return re.search(rf"{option} <([^>]+)>", help_text).group(1).split("|")


def test_every_choice_offered_is_one_the_stages_accept(capsys):
    for name in train.CLASSIFIERS:
        train.make_classifier(name)
    for name in train.SPLITS:
        train.check_split(name)
    for name in choices.EXPERIMENT_SPLITS:
        experiments.check_split_choice(name)
    assert experiments.parse_classifiers(options.PAPER_CLASSIFIERS.split(","))
    # --precision: every choice the command line offers builds a recipe of a concrete precision
    # (auto resolves to this machine's), and one it does not offer is refused by the recipe too.
    offered = set(option_choices(capsys, "run", "--precision"))
    assert offered == {"fp32", "bf16", "auto"}
    for name in offered:
        built = FeatureRecipe(("vgg16",), "none", 32, precision=name).precision
        assert built in recipe.PRECISIONS and built == (
            bb.native_precision() if name == "auto" else name
        )
    with pytest.raises(LeukoflowError, match="--precision wants one of fp32, bf16, auto"):
        FeatureRecipe(("vgg16",), "none", 32, precision="fp8")


def test_every_extracting_command_takes_the_recipe_and_compute_options():
    for name in EXTRACTING:
        names = set(command_options(name))
        assert RECIPE_OPTIONS <= names, name
        assert COMPUTE_OPTIONS <= names, name
    score = set(command_options("score"))
    assert COMPUTE_OPTIONS <= score and "--precision" in score and "--weights-dir" in score


def test_each_option_appears_once_per_command():
    command = typer.main.get_command(app)
    groups = {n for n, c in command.commands.items() if hasattr(c, "commands")}  # sub-apps
    assert {"models", "export"} <= groups
    paths = [(n,) for n in command.commands if n not in groups]
    paths += [(g, n) for g in sorted(groups) for n in command.commands[g].commands]
    for path in paths:
        names = command_options(*path)
        assert len(names) == len(set(names)), path
        assert names.count("--json") == 1, path
    assert "--store" not in command_options("demo")


def probe_command() -> tuple[typer.Typer, dict]:
    """A one-command app taking the shared options; the dict gets what they built."""
    built: dict = {}
    probe = typer.Typer()

    @probe.command()
    @shared_options
    def go(recipe: FeatureRecipe = RECIPE, compute: Compute = COMPUTE) -> None:
        built.update(recipe=recipe, compute=compute)

    return probe, built


def test_the_options_build_one_recipe_and_one_compute_setting():
    probe, built = probe_command()
    result = CliRunner().invoke(
        probe,
        ["--backbones", "vgg16,color_morphology", "--weights", "none", "--image-size", "64",
         "--seed", "3", "--precision", "bf16", "--ray-address", "ray://head:10001",
         "--batch-size", "8", "--gpu-share", "0.5", "--actor-cpus", "2", "--batch-timeout", "60"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert built["recipe"] == FeatureRecipe(("vgg16", "color_morphology"), "none", 64, 3, "bf16")
    assert built["compute"] == Compute("ray://head:10001", 8, 0.5, 2.0, 60.0)


def test_without_options_the_recipe_and_compute_are_their_owners_defaults():
    probe, built = probe_command()
    # The default weights (imagenet) need their files, which this machine has not got.
    result = CliRunner().invoke(probe, ["--weights", "none"])
    assert result.exit_code == 0, result.output
    assert built == {"recipe": FeatureRecipe(weights="none"), "compute": Compute()}
    weights = next(p for p in typer.main.get_command(probe).params if p.name == "weights")
    assert weights.default == FeatureRecipe().weights


def option_defaults(*path: str) -> dict[str, object]:
    """Each option's default as click holds it, by its first name."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {param.opts[0]: param.default for param in command.params}


def test_the_sweep_dashboard_and_fhir_defaults_are_their_owners():
    from flows.score import score_inbox
    from leukoflow.present import dashboard, fhir

    flow_defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(score_inbox.fn).parameters.items()
    }
    score = option_defaults("score")
    assert score["--dataset"] == flow_defaults["dataset"]
    assert score["--explain-limit"] == flow_defaults["explain_limit"]
    page = inspect.signature(dashboard.write_dashboard).parameters
    shown = option_defaults("dashboard")
    assert shown["--nights"] == page["limit"].default
    assert shown["--stale-after-hours"] == page["stale_after_hours"].default
    sent = option_defaults("export", "fhir")
    assert (sent["--timeout"], sent["--attempts"]) == (
        fhir.SendSettings().timeout_s,
        fhir.SendSettings().attempts,
    )


def test_a_command_can_change_a_groups_defaults(capsys):
    help_text = "".join(leukoflow_here(capsys, "experiments", "--help").stdout.split())
    assert (
        "[default:vgg16,vgg19,resnet101,mobilenet_v2,inception_resnet_v2,densenet121]" in help_text
    )
    demo_help = "".join(leukoflow_here(capsys, "demo", "--help").stdout.split())
    assert "DIR[default:none]" in demo_help


def test_every_extracting_command_refuses_an_unschedulable_actor_share(
    tmp_path, synthetic_images, capsys
):
    store = tmp_path / "store"
    for name, *rest in (
        ["run", synthetic_images, "--weights", "none"],
        ["validate", synthetic_images, "--weights", "none"],
        ["experiments", "--weights", "none"],
        ["backfill", synthetic_images, "--dataset", "d", "--weights", "none"],
        ["score", synthetic_images],
    ):
        base = [name, *rest, "--store", store]
        gpu = leukoflow_here(capsys, *base, "--gpu-share", "1.5")
        assert_user_error(gpu, "--gpu-share", "1.5")
        assert_user_error(leukoflow_here(capsys, *base, "--actor-cpus", "0"), "--actor-cpus")
        assert_user_error(leukoflow_here(capsys, *base, "--batch-timeout", "0"), "--batch-timeout")
    assert not store.exists()  # refused before anything was written
