"""One import root: the wheel installs `leukoflow` only, with tasks/ and flows/ inside it and the
development tools (bench/) left out, so nothing generic such as `tasks` reaches site-packages."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(ROOT), "-w", str(out)],
        check=True, timeout=600,
    )  # fmt: skip
    (built,) = out.glob("leukoflow-*.whl")
    return built


def test_the_wheel_holds_one_package_with_its_templates_and_no_dev_tools(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("leukoflow-")}
    assert tops == {"leukoflow"}  # no top-level tasks/, flows/ or bench/
    expected = [
        "leukoflow/tasks/catalog.py",
        "leukoflow/flows/score.py",
        "leukoflow/cli/__init__.py",
        "leukoflow/tasks/templates/base.html",
    ]
    assert set(expected) <= set(names)
    assert not any("bench" in name.split("/") for name in names)


def test_installed_not_editable_only_the_leukoflow_root_imports(wheel, tmp_path):
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)],
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
    result = imports("leukoflow.tasks.catalog")
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(fresh_site) in result.stdout  # the installed copy, not the checkout
