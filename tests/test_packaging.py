"""One import root: the wheel installs `leukoflow` only, with tasks/ and flows/ inside it and the
development tools (bench/) left out, so nothing generic such as `tasks` reaches site-packages."""

from __future__ import annotations

import site
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_the_build_backend_is_in_the_test_environment():
    """The wheel is built with the environment's own setuptools (no build isolation, no package
    index: CI machines may have none), so the dev extras must bring what [build-system] asks."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for text in requires:
        requirement = Requirement(text)
        installed = version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{requirement.name} {installed} does not satisfy {text}: `make test` installs "
            "the dev extras of pyproject.toml, which must list it"
        )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-index and no isolation: nothing is fetched; the environment's setuptools builds it.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", str(ROOT), "-w", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel_file,) = out.glob("leukoflow-*.whl")
    return wheel_file


def test_the_wheel_holds_one_package_with_its_templates_and_no_dev_tools(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("leukoflow-")}
    assert tops == {"leukoflow"}  # no top-level tasks/, flows/ or bench/
    expected = [
        "leukoflow/features/catalog.py",
        "leukoflow/tasks/stage_tasks.py",
        "leukoflow/flows/score.py",
        "leukoflow/cli/__init__.py",
        "leukoflow/present/templates/base.html",
    ]
    assert set(expected) <= set(names)
    assert not any("bench" in name.split("/") for name in names)


def test_installed_not_editable_only_the_leukoflow_root_imports(wheel, tmp_path):
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    # The dependencies come from the test's own environment, appended after the fresh venv's
    # site-packages (a .pth there is not processed, so its editable install stays out).
    deps = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    fresh_site = next((env_dir / "lib").glob("python3.*/site-packages"))
    (fresh_site / "deps.pth").write_text(deps + "\n")

    def imports(module: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(python), "-c", f"import {module}, sys; print({module}.__file__)"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    for generic in ("tasks", "flows", "bench"):
        result = imports(generic)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, generic
    result = imports("leukoflow.features.catalog")
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(fresh_site) in result.stdout  # the installed copy, not the checkout
