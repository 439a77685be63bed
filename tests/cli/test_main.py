"""Click's conventions, as a user meets them in a separate process: help, --version, usage
errors (exit 2 with click's usage message), configuration errors and run failures."""

import subprocess
import sys
from importlib.metadata import version

import pytest

from leukoflow.cli import main
from leukoflow.store import registry
from leukoflow.store.storage import open_location

from . import assert_click_usage, assert_user_error, leukoflow, leukoflow_here
from .test_models import fitted_record


@pytest.mark.parametrize("args", [[], ["models"]])
def test_a_bare_group_prints_its_help_and_succeeds(capsys, args):
    result = leukoflow_here(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: leukoflow {' '.join(args)}".rstrip() + " [OPTIONS]")
    assert "Commands:" in result.stdout and result.stderr == ""


def test_version_comes_from_the_installed_package(capsys):
    result = leukoflow_here(capsys, "--version")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip() == f"leukoflow {version('leukoflow')}"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["status", "--stor", "x"], ["No such option: --stor"]),
        (["status"], ["Missing option '--store'"]),
        (["run", "--store", "s"], ["Missing argument"]),
        (["validate", "--store", "s"], ["Missing argument"]),
        (["models", "show", "--store", "s"], ["Missing argument"]),
        (["run", "x", "--store", "s", "--image-size", "big"], ["--image-size", "valid integer"]),
        (["run", "x", "--store", "s", "--classifier", "xgboost"], ["--classifier", "xgboost"]),
        (["run", "x", "--store", "s", "--split", "time"], ["--split", "time"]),
        (["run", "x", "--store", "s", "--precision", "fp8"], ["--precision", "fp8"]),
        (["experiments", "--store", "s", "--split", "sideways"], ["--split", "sideways"]),
        (["frobnicate"], ["No such command 'frobnicate'"]),
    ],
)
def test_bad_usage_prints_clicks_usage_message_and_exits_2(capsys, args, words):
    assert_click_usage(leukoflow_here(capsys, *args), *words)


def test_the_script_keeps_the_conventions(tmp_path):
    """One process per exit status, as a user's shell sees it: the status, no traceback, and one
    line on stderr (the cases behind each status run in-process in the other tests)."""
    # 0: done. `python -m leukoflow`, the package's own entry point.
    done = subprocess.run(
        [sys.executable, "-m", "leukoflow", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == f"leukoflow {version('leukoflow')}\n"
    # 2: bad usage, click's usage message.
    assert_click_usage(leukoflow("status", "--stor", "x"), "No such option: --stor")
    # 2: a configuration error, one `leukoflow: error:` line.
    missing = tmp_path / "no-such-store"
    configuration = leukoflow("status", "--store", missing)
    assert_user_error(configuration, f"no store at {missing}")
    assert configuration.stderr.count("\n") == 1 and configuration.stdout == ""
    # 1: the run failed; here a model whose threshold was changed after saving is refused.
    root = open_location(str(tmp_path / "store"))
    registry.save_model(root, "m-1", *fitted_record("m-1", 0.9))
    record = tmp_path / "store" / "models" / "m-1" / "model.json"
    record.write_text(record.read_text().replace('"threshold": 0.42', '"threshold": 0.01'))
    refused = leukoflow("models", "show", "m-1", "--store", tmp_path / "store")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("leukoflow: refused: model file refused: model m-1 in ")
    assert "model.json is not the file that was saved" in refused.stderr
    assert refused.stderr.count("\n") == 1 and refused.stdout == ""


def test_help_lists_the_choices_of_split_and_classifier(capsys):
    run_help = leukoflow_here(capsys, "run", "--help").stdout
    assert "--split <random|subject>" in run_help
    assert "--classifier <linear-svm|rbf-svm|knn|tree|forest|mlp>" in run_help
    assert "--precision <fp32|bf16|auto>" in run_help
    assert "--split <random|subject|both>" in leukoflow_here(capsys, "experiments", "--help").stdout


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["dashboard", "--out", "page.html"],
        ["models", "list"],
        ["models", "show", "current"],
        ["models", "promote", "m-1"],
    ],
)
def test_read_only_commands_refuse_a_store_that_does_not_exist(tmp_path, capsys, args):
    missing = tmp_path / "no-such-store"
    result = leukoflow_here(capsys, *args, "--store", missing)
    assert_user_error(result, f"no store at {missing}")
    assert result.stderr.count("\n") == 1 and not missing.exists()


def test_a_file_is_not_a_store(tmp_path, capsys):
    (tmp_path / "store").write_text("not a folder")
    assert_user_error(leukoflow_here(capsys, "status", "--store", tmp_path / "store"), "no store")


def test_a_failure_that_is_not_the_users_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    from leukoflow.store import status

    def broken(store):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(status, "store_status", broken)
    result = leukoflow_here(capsys, "status", "--store", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("leukoflow: run failed: RuntimeError: disk on fire (")
    assert result.stderr.count("\n") == 1


def test_main_reads_sys_argv_like_the_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["leukoflow", "status", "--stor", "x"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2 and "No such option" in capsys.readouterr().err
