"""The one Jinja2 environment: autoescape, strict undefined, shipped templates, no page markup
built in Python strings."""

from __future__ import annotations

import fnmatch
import html
import json
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pytest

from leukoflow.present import pages
from leukoflow.present.report import render_report

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_FOLDERS = ("tasks", "flows", "leukoflow")
# Page markup that belongs in templates, never in a Python string of a product module.
MARKUP = re.compile(r"<(html|body|head|table|tr|td|th|div|img|figure|h[1-6])[\s>]", re.I)


def test_html_is_escaped_and_markdown_is_not():
    env = pages.environment()
    assert env.from_string("{{ v }}").render(v="<script>&") == "&lt;script&gt;&amp;"
    template = env.get_template("_macros.md")  # a .md template: no autoescape
    assert template.environment.autoescape(template.name) is False
    assert env.autoescape("report.html") is True and env.autoescape("report.md") is False


def test_a_misspelt_field_is_an_error_not_an_empty_cell():
    @dataclass
    class View:
        title: str

    with pytest.raises(jinja2.UndefinedError):
        pages.environment().from_string("{{ page.titel }}").render(page=View("x"))


def test_every_template_compiles_and_is_shipped_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["leukoflow.present"]
    names = pages.environment().list_templates()
    assert {"base.html", "report.html", "report.md", "experiments.html", "dashboard.html"} <= set(
        names
    )
    for name in names:
        pages.environment().get_template(name)  # parses
        assert any(fnmatch.fnmatch(f"templates/{name}", p) for p in patterns), name
        assert "/" not in name  # package-data globs above do not reach into subfolders


def test_the_css_and_skeleton_are_written_once():
    texts = {p.name: p.read_text() for p in pages.TEMPLATES.iterdir() if p.is_file()}
    assert [n for n, t in texts.items() if "<style>" in t] == ["base.html"]
    assert [n for n, t in texts.items() if "<html" in t] == ["base.html"]
    for name in ("report.html", "experiments.html", "dashboard.html"):
        assert texts[name].startswith('{% extends "base.html" %}')


def test_tables_mark_the_best_row_and_right_align_numbers():
    table = pages.table(["name", "kind", "value"], [("a", "x", 1), ("<b>", "y", 2.5)], 1, best=1)
    page = (
        pages.environment()
        .from_string('{% import "_macros.html" as m %}{{ m.table(t) }}')
        .render(t=table)
    )
    assert '<tr class="best"><th>&lt;b&gt;</th><td>y</td><td class="num">2.5</td></tr>' in page
    assert '<tr><th>a</th><td>x</td><td class="num">1</td></tr>' in page
    md = pages.environment().get_template("_macros.md").module.table(table)
    assert "|---|---|---:|" in md and "| &lt;b&gt; | y | 2.5 |" in md


def test_markdown_cells_escape_pipes_and_markup():
    assert pages.markdown_cell("a|b <i>\nc") == "a\\|b &lt;i&gt; c"


def test_plots_must_be_inline_images():
    pages.Plot("data:image/png;base64,AAAA", "ok")
    with pytest.raises(ValueError, match="data URIs"):
        pages.Plot("https://example.org/x.png", "remote")


def test_no_product_module_builds_page_markup_in_python():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in PRODUCT_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if MARKUP.search(line)
    ]
    assert offenders == []


# In the browser's load event (every image has loaded or failed by then) a probe writes what it
# made of each image into the DOM, which --dump-dom prints (as tests/present/test_dashboard.py).
PROBE = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify([...document.images].map((img) => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth})));
  document.body.appendChild(out);
});
</script>"""


def images_in_chromium(page: str, tmp_path: Path) -> list[dict]:
    """Open a page in headless Chromium with the network off; what became of each image."""
    chromium = "/usr/bin/chromium"
    assert os.access(chromium, os.X_OK), "chromium is missing: `make test` installs it"
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    try:
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--proxy-server=127.0.0.1:9",  # any network request would fail
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
             probe.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe did not run: {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_the_evaluation_report_renders_offline_in_headless_chromium(tmp_path):
    y_true = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.7, 0.4, 0.6, 0.2, 0.1])
    _, page = render_report({"dataset": "tiny"}, y_true, (scores >= 0.5).astype(int), scores)
    images = images_in_chromium(page, tmp_path)
    assert [i["alt"] for i in images] == ["Confusion matrix", "ROC curve"]
    assert all(i["complete"] and i["width"] > 200 for i in images), images
