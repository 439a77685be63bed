"""`leukoflow demo`, the README's first command, as a user runs it: a separate process (the
process-level behaviour is the point: exit status, what it prints, what it leaves on disk), made
small with its own options (4 subjects x 3 cells, vgg16 at 32 px; the README's defaults run the
trio at 224 px, minutes on 2 cores). It reports to the session's Prefect server
(PREFECT_API_URL is in the environment) and starts its own local Ray."""

import re
from pathlib import Path

import pytest

from leukoflow.vocabulary import NON_CLINICAL_NOTICE

from . import leukoflow

pytestmark = pytest.mark.integration


def test_demo_runs_the_whole_pipeline_and_says_it_is_not_clinical(tmp_path, prefect_server):
    out = tmp_path / "demo output"  # a space: paths are printed whole and reopened as printed
    result = leukoflow(
        "demo", "--out", out, "--subjects", 4, "--cells-per-subject", 3,
        "--backbones", "vgg16", "--image-size", 32,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    stdout = result.stdout
    lines = stdout.splitlines()
    # The non-clinical notice comes first, before any number.
    assert lines[0] == NON_CLINICAL_NOTICE
    images = sorted((out / "images").rglob("*.bmp"))
    assert len(images) == 12
    summary = re.search(
        r"^leukoflow run (\S+) on dataset synthetic-demo: 12 images found, 12 featurised, "
        r"0 quarantined, 0 duplicates$",
        stdout,
        re.MULTILINE,
    )
    assert summary, stdout
    assert "features: vgg16 = 512 per image; computed now: {'vgg16': 12}" in stdout
    assert "linear-svm on a subject split (6 train / 6 test)" in stdout
    assert re.search(r"^│ accuracy +│ [01]\.\d{4} │$", stdout, re.MULTILINE), stdout
    (model_line,) = [line for line in lines if line.startswith("model: ")]
    model_id = model_line.removeprefix("model: ").removesuffix(" (current)")
    assert model_line.endswith(" (current)")
    (report_line,) = [line for line in lines if line.startswith("report: ")]
    report = Path(report_line.removeprefix("report: "))
    assert report.is_file() and report.parent == out / "store" / "models" / model_id
    html = report.read_text()
    assert "NOT CLINICALLY MEANINGFUL" in html and model_id in html
    assert (out / "store" / "models" / model_id / "metrics.json").is_file()
