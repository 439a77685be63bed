"""The evaluation report: self-contained HTML, warnings, escaping and truncation."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from leukoflow.learn.evaluate import compute_metrics
from leukoflow.present.report import (
    NON_CLINICAL_WARNING,
    figure_to_data_uri,
    plot_confusion_matrix,
    plot_roc,
    render_experiments_html,
    render_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Y_TRUE = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
Y_PRED = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.75, 0.1, 0.3, 0.05, 0.4])


def make_summary(**overrides: object) -> dict:
    summary = {
        "model_id": "m-20260101-abc",
        "dataset": "c-nmc-2019",
        "backbones": ["resnet50", "densenet121"],
        "feature_dim": 3072,
        "weights_id": "imagenet",
        "non_clinical": False,
        "image_size": 224,
        "classifier": "LinearSVC",
        "classifier_params": {"C": 0.5, "class_weight": "balanced"},
        "split": "subject",
        "seed": 42,
        "n_train": 40,
        "n_test": 10,
        "counts": {"found": 55, "featurised": 50, "quarantined": 3, "duplicate": 2},
        "quarantined": [
            {"image_id": "aaa111", "reason": "unreadable"},
            {"image_id": "bbb222", "reason": "too small"},
            {"image_id": "ccc333", "reason": "grayscale"},
        ],
        "metrics": compute_metrics(Y_TRUE, Y_PRED, SCORES),
        "created_at": "2026-01-01T00:00:00Z",
        "package_versions": {"scikit-learn": "1.9.1", "numpy": "2.4.6"},
    }
    summary.update(overrides)
    return summary


def data_images(html_text: str) -> list[bytes]:
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    return [base64.b64decode(u) for u in uris]


def test_html_is_self_contained_with_two_plots() -> None:
    markdown, html_text = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES)
    assert "http://" not in html_text and "https://" not in html_text
    assert "<script" not in html_text.lower()
    assert "<link" not in html_text.lower() and "@import" not in html_text
    images = data_images(html_text)
    assert len(images) >= 2
    assert all(img.startswith(PNG_MAGIC) for img in images)
    # Every <img> is an inline data URI, nothing points elsewhere.
    assert html_text.count("<img ") == len(images)
    assert html_text.startswith("<!DOCTYPE html>") and "<style>" in html_text
    assert "leukoflow evaluation report" in html_text and "leukoflow evaluation report" in markdown


def test_run_facts_present() -> None:
    markdown, html_text = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES)
    for text in (markdown, html_text):
        assert "c-nmc-2019" in text
        assert text.index("resnet50") < text.index("densenet121")  # concatenation order
        assert "3072" in text and "imagenet" in text and "224" in text
        assert "LinearSVC" in text and "C=0.5" in text and "balanced" in text
        assert "subject" in text and "42" in text
        assert "inflates accuracy" in text
        assert "scikit-learn" in text


@pytest.mark.parametrize("non_clinical", [True, False])
def test_non_clinical_banner_iff_flag(non_clinical: bool) -> None:
    summary = make_summary(non_clinical=non_clinical, weights_id="none")
    markdown, html_text = render_report(summary, Y_TRUE, Y_PRED, SCORES)
    assert (NON_CLINICAL_WARNING in html_text) is non_clinical
    assert (NON_CLINICAL_WARNING in markdown) is non_clinical
    assert ("NOT CLINICALLY MEANINGFUL" in html_text) is non_clinical
    if non_clinical:
        # At the very top: before the title in both formats.
        assert html_text.index(NON_CLINICAL_WARNING) < html_text.index("<h1>")
        assert markdown.index(NON_CLINICAL_WARNING) < markdown.index("# leukoflow")


def test_text_is_html_escaped() -> None:
    summary = make_summary(
        dataset='<script>alert("x")</script>',
        quarantined=[{"image_id": "<b>id</b>", "reason": "bad & <ugly>"}],
    )
    markdown, html_text = render_report(summary, Y_TRUE, Y_PRED, SCORES)
    assert "<script>" not in html_text
    # Jinja2's autoescape writes a double quote as &#34; (the same character as &quot;).
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html_text
    assert "<b>id</b>" not in html_text and "bad &amp; &lt;ugly&gt;" in html_text
    assert "<script>" not in markdown


def test_markdown_metrics_and_confusion_tables() -> None:
    markdown, _ = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES)
    assert "| Metric | Value |" in markdown
    assert "| Accuracy | 0.7000 |" in markdown
    assert "| Balanced accuracy | 0.7083 |" in markdown
    assert "| Precision (all) | 0.6000 |" in markdown
    assert "| Recall (all) | 0.7500 |" in markdown
    assert "| F1 (all) | 0.6667 |" in markdown
    assert "| ROC AUC | 0.7917 |" in markdown
    assert "Macro F1" in markdown and "Weighted F1" in markdown
    assert "| **hem** | 4 | 2 |" in markdown
    assert "| **all** | 1 | 3 |" in markdown


def test_image_accounting_and_mismatch() -> None:
    markdown, html_text = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES)
    assert "55 = 50 + 3 + 2" in markdown and "55 = 50 + 3 + 2" in html_text
    bad = make_summary(counts={"found": 60, "featurised": 50, "quarantined": 3, "duplicate": 2})
    markdown, html_text = render_report(bad, Y_TRUE, Y_PRED, SCORES)
    assert "MISMATCH" in markdown and "MISMATCH" in html_text


def test_quarantine_list_truncated_at_50() -> None:
    items = [{"image_id": f"img{i:03d}", "reason": "unreadable"} for i in range(73)]
    markdown, html_text = render_report(make_summary(quarantined=items), Y_TRUE, Y_PRED, SCORES)
    for text in (markdown, html_text):
        assert "img049" in text
        assert "img050" not in text
        assert "and 23 more" in text
    short_md, _ = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES)
    assert "more." not in short_md and "aaa111" in short_md


def test_no_roc_without_scores_or_with_one_class() -> None:
    summary = make_summary(metrics=compute_metrics(Y_TRUE, Y_PRED, None))
    markdown, html_text = render_report(summary, Y_TRUE, Y_PRED, None)
    assert len(data_images(html_text)) == 1  # confusion matrix only
    assert "No ROC curve" in markdown and "No ROC curve" in html_text
    assert "| ROC AUC | n/a |" in markdown

    y_one = np.ones(4, dtype=int)
    one = make_summary(metrics=compute_metrics(y_one, y_one, np.linspace(0, 1, 4)))
    _, html_text = render_report(one, y_one, y_one, np.linspace(0, 1, 4))
    assert len(data_images(html_text)) == 1
    assert "only one class" in html_text


def test_missing_optional_keys_are_tolerated() -> None:
    summary = {"dataset": "tiny", "non_clinical": False}
    markdown, html_text = render_report(summary, Y_TRUE, Y_PRED, SCORES)
    # Metrics are recomputed from the arrays when the summary lacks them.
    assert "| Accuracy | 0.7000 |" in markdown
    assert "n/a" in markdown
    assert len(data_images(html_text)) == 2


def test_plot_helpers_return_figures_and_pngs() -> None:
    cm = plot_confusion_matrix([[4, 2], [1, 3]], ["hem", "all"])
    roc = plot_roc([0.0, 0.5, 1.0], [0.0, 0.8, 1.0], 0.75)
    no_auc = plot_roc([0.0, 1.0], [0.0, 1.0], None)
    for fig in (cm, roc, no_auc):
        assert isinstance(fig, Figure)
        uri = figure_to_data_uri(fig)
        assert uri.startswith("data:image/png;base64,")
        assert base64.b64decode(uri.split(",", 1)[1]).startswith(PNG_MAGIC)
    texts = [t.get_text() for t in cm.axes[0].texts]
    assert sorted(texts) == ["1", "2", "3", "4"]
    assert "0.7500" in roc.axes[0].get_legend().get_texts()[0].get_text()


# -- the saved model at its operating point, per cell and per patient ------------------------
SUBJECTS = ["MRN-0048213-77"] * 4 + ["MRN-0099999-01"] * 3 + ["MRN-0011111-22"] * 3
HELD_OUT = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.3, 0.05, 0.1, 0.2])


def operating_point() -> dict:
    """The saved model at threshold 0.5, in learn/fit's form, patients from learn/patient."""
    from leukoflow.learn import patient

    labels, _ = patient.patient_labels(SUBJECTS, Y_TRUE)
    decisions = patient.decide(patient.patient_scores(SUBJECTS, HELD_OUT, 0.5), 0.5)
    return {
        "threshold": 0.5,
        "cells": {
            "n": 10,
            "sensitivity": 0.75,
            "sensitivity_ci": [0.5, 1.0],
            "sensitivity_n": 4,
            "specificity": 5 / 6,
            "specificity_ci": [0.6, 1.0],
            "specificity_n": 6,
        },
        "patients": patient.patient_metrics(decisions, labels, n_boot=50, seed=0),
    }


def test_the_operating_point_shows_cells_and_patients_with_n_and_intervals() -> None:
    point = operating_point()
    markdown, html_text = render_report(
        make_summary(), Y_TRUE, Y_PRED, SCORES, operating_point=point
    )
    for text in (markdown, html_text):
        assert "At the operating point: cells and patients" in text
        assert "0.7500 [0.5000, 1.0000] (n=4)" in text  # cell sensitivity, interval, n
        assert "0.8333 [0.6000, 1.0000] (n=6)" in text
        assert "10 test cells from 3 patients" in text
        assert "MRN-" not in text  # per-patient rows hold subject ids: never shown
    sensitivity = point["patients"]["metrics"]["sensitivity"]
    assert f"{sensitivity['value']:.4f} [{sensitivity['low']:.4f}" in markdown
    assert "(n=1)" in markdown and "(n=2)" in markdown  # one ALL patient, two normal ones
    # The patient-level part alone works too, and cell-level cells say n/a.
    markdown, _ = render_report(
        make_summary(), Y_TRUE, Y_PRED, SCORES, patient_level=point["patients"]
    )
    assert "| Count | n/a | 3 |" in markdown


def test_without_subject_ids_the_operating_point_says_so() -> None:
    point = {**operating_point(), "patients": None}
    markdown, _ = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES, operating_point=point)
    assert "No patient-level result" in markdown and "| Count | 10 | n/a |" in markdown


def test_the_saved_model_leads_and_the_paper_follows() -> None:
    point = operating_point()
    markdown, html_text = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES)
    assert "The paper's method" not in markdown  # no saved model: the paper's metrics alone
    markdown, html_text = render_report(
        make_summary(), Y_TRUE, Y_PRED, SCORES, operating_point=point
    )
    for text, heading in ((markdown, "## The paper's method"), (html_text, "The paper's method")):
        assert text.index("At the operating point") < text.index(heading)
        assert text.index(heading) < text.index("Metrics") < text.index("Images")
    assert "### Metrics" in markdown and "<h3>Metrics</h3>" in html_text


def test_example_captions_carry_the_subject_key_file_and_score() -> None:
    example = {
        "kind": "FP",
        "image_id": "c" * 64,
        "png_data_uri": "data:image/png;base64,AAAA",
        "subject_key": "S-0123456789ab",
        "file_name": "UID_H3_1_2_hem.bmp",
        "score": 0.81,
        "threshold": 0.5,
    }
    _, html_text = render_report(make_summary(), Y_TRUE, Y_PRED, SCORES, examples=[example])
    caption = "FP cccccccccccccccc: subject S-0123456789ab, UID_H3_1_2_hem.bmp, score 0.8100 "
    assert f'alt="{caption}(threshold 0.5000)"' in html_text


def test_the_experiments_page_escapes_and_stays_offline() -> None:
    summary = {
        "experiment_id": "exp-1",
        "dataset": "<script>alert(1)</script>",
        "note": "NOT CLINICALLY MEANINGFUL <b>",
        "evaluations": [],
        "cells": [],
        "package_versions": {"jinja2": "3.1.6"},
    }
    page = render_experiments_html(summary)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<div class="warning">NOT CLINICALLY MEANINGFUL &lt;b&gt;</div>' in page
    assert "http" not in page and "<img" not in page  # no grid, no plot, nothing to fetch
