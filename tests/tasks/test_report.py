"""The evaluation report: self-contained HTML, warnings, escaping and truncation."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from leukoflow.tasks.evaluate import compute_metrics
from leukoflow.tasks.report import (
    NON_CLINICAL_WARNING,
    figure_to_data_uri,
    plot_confusion_matrix,
    plot_roc,
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
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html_text
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
