"""Evaluation report for one trained model (Markdown plus a self-contained HTML page), and the
experiments page.

Both are built in two steps: a view model (plain dataclasses: tables of text, plots as data URIs)
computed here, then laid out by the templates in present/templates (report.html, report.md,
experiments.html; see present/pages). The HTML must open offline from a laptop or an S3 console
download: inline CSS, base64 PNG data URIs, no scripts, external links or web fonts. Plots use
`matplotlib.figure.Figure` objects directly (never pyplot), so reports can be rendered from worker
threads without touching global state or needing a display.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from leukoflow.learn import experiments as ex
from leukoflow.learn.evaluate import (
    NEGATIVE_LABEL,
    POSITIVE_LABEL,
    compute_metrics,
    pr_points,
    roc_points,
)
from leukoflow.present import pages
from leukoflow.present.pages import DATA_URI_PREFIX, Plot, Table, table
from leukoflow.vocabulary import NON_CLINICAL_NOTICE

TITLE = "leukoflow evaluation report"
NON_CLINICAL_WARNING = NON_CLINICAL_NOTICE
MAX_QUARANTINE_SHOWN = 50

# (metrics key, display name), in the order the table shows them.
METRIC_ROWS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("precision", "Precision (all)"),
    ("recall", "Recall (all)"),
    ("f1", "F1 (all)"),
    ("f1_macro", "Macro F1"),
    ("f1_weighted", "Weighted F1"),
    ("roc_auc", "ROC AUC"),
)


# -- plots -----------------------------------------------------------------------------------
def figure_to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """Render a Figure to PNG and return it as a `data:image/png;base64,...` URI."""
    # Attach an Agg canvas explicitly so rendering never depends on the global backend.
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # Software=None drops matplotlib's PNG metadata, which would otherwise carry a URL.
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> Figure:
    """Heatmap of a confusion matrix (rows = true class, columns = predicted) with counts."""
    counts = np.asarray(matrix, dtype=np.int64)
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts are whole cells
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels=list(labels))
    ax.set_yticks(ticks, labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    # Dark cells get white text so the count stays readable against the colour map.
    threshold = counts.max() / 2 if counts.size and counts.max() > 0 else 0
    for (row, col), value in np.ndenumerate(counts):
        colour = "white" if value > threshold else "black"
        ax.text(col, row, str(value), ha="center", va="center", color=colour, fontsize=12)
    fig.tight_layout()
    return fig


def plot_roc(
    fpr: Sequence[float],
    tpr: Sequence[float],
    auc: float | None,
    operating_point: tuple[float, float] | None = None,
) -> Figure:
    """ROC curve with the chance diagonal; the AUC when known; the operating point (fpr, tpr)."""
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot()
    label = "ROC" if auc is None else f"ROC (AUC = {auc:.4f})"
    ax.plot(fpr, tpr, color="#1f4e9c", linewidth=2, label=label)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="chance")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="#c81e1e", markersize=8, label="operating point")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (hem called all)")
    ax.set_ylabel("true positive rate (all found)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_precision_recall(
    recall: Sequence[float],
    precision: Sequence[float],
    prevalence: float | None = None,
    operating_point: tuple[float, float] | None = None,
) -> Figure:
    """Precision-recall curve for ALL; the no-skill line at the prevalence; the operating point."""
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot()
    ax.plot(recall, precision, color="#1f4e9c", linewidth=2, label="precision-recall")
    if prevalence is not None:
        ax.axhline(prevalence, color="#999999", linestyle="--", linewidth=1, label="no skill")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="#c81e1e", markersize=8, label="operating point")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall (all found)")
    ax.set_ylabel("precision (flagged that are all)")
    ax.set_title("Precision-recall curve")
    ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def plot_reliability(curves: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """Reliability diagram: per probability bin, the mean prediction against the share of ALL."""
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfect")
    for (name, points), style in zip(curves.items(), ("o-", "s-", "^-"), strict=False):
        ax.plot(points["mean_predicted"], points["fraction_all"], style, label=name)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("predicted probability of all")
    ax.set_ylabel("observed share of all")
    ax.set_title("Calibration curve")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_split_gap(points: Sequence[tuple[str, float, float]]) -> Figure:
    """Each grid cell's accuracy on the random split (x) against the subject split (y)."""
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    low = min([*xs, *ys, 0.5]) - 0.02
    ax.plot([low, 1], [low, 1], color="#999999", linestyle="--", linewidth=1, label="no gap")
    ax.scatter(xs, ys, color="#1f4e9c", label="feature set x classifier")
    ax.set_xlim(low, 1.01)
    ax.set_ylim(low, 1.01)
    ax.set_xlabel("accuracy, random image split (paper)")
    ax.set_ylabel("accuracy, subject-grouped folds (mean)")
    ax.set_title("Random split vs. subject folds")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


# -- formatting helpers ----------------------------------------------------------------------
def _fmt_metric(value: Any) -> str:
    if value is None:
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if np.isnan(number) else f"{number:.4f}"


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _fmt_params(params: Any) -> str:
    if not params:
        return "defaults"
    if isinstance(params, Mapping):
        return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in params.items())
    return str(params)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _versions(summary: Mapping[str, Any]) -> Table | None:
    versions = summary.get("package_versions") or {}
    if not versions:
        return None
    return table(["package", "version"], [(k, _fmt(v)) for k, v in versions.items()])


def _plot(fig: Figure, caption: str) -> Plot:
    return Plot(figure_to_data_uri(fig), caption)


# -- the view model --------------------------------------------------------------------------
@dataclass(frozen=True)
class Confusion:
    """A confusion matrix (rows = true class, columns = predicted) as both pages show it."""

    labels: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]

    def table(self) -> Table:
        rows = [[label, *row] for label, row in zip(self.labels, self.matrix, strict=False)]
        return table(["true \\ predicted", *self.labels], rows, numeric=len(self.labels))


@dataclass(frozen=True)
class OperatingPointView:
    """The saved model at its threshold on the held-out split, per cell and per patient."""

    title: str
    table: Table
    patient_confusion: Confusion | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class RiskView:
    """The saved, calibrated model at its operating point."""

    title: str
    explanation: str
    table: Table
    confusion: Confusion
    plots: tuple[Plot, ...]


@dataclass(frozen=True)
class ExampleGroup:
    """Test cells of one kind (TP, FP, FN) with their activation maps."""

    kind: str
    meaning: str
    plots: tuple[Plot, ...]


@dataclass(frozen=True)
class ExamplesView:
    title: str
    groups: tuple[ExampleGroup, ...]
    rows: Table  # kind and image id of every example, for the Markdown report


@dataclass(frozen=True)
class ReportView:
    """Everything the evaluation report shows, in both its HTML and Markdown forms."""

    title: str
    warning: str | None
    facts: Table
    split: str
    metrics: Table
    n_test: str
    support: tuple[tuple[str, str], ...]  # (class label, cells of that class) in the test split
    positive_label: str
    confusion: Confusion
    plots: tuple[Plot, ...]
    no_roc_reason: str
    risk: RiskView | None
    operating_point: OperatingPointView | None
    saved_model_first: bool  # a saved model is reported: its sections lead, the paper's follow
    examples: ExamplesView | None
    accounting: Table
    accounting_check: str
    quarantine: Table | None
    quarantine_more: int
    versions: Table | None


# -- report content --------------------------------------------------------------------------
def _run_facts(summary: Mapping[str, Any]) -> Table:
    backbones = list(summary.get("backbones") or [])
    backbone_text = " + ".join(f"{i}. {b}" for i, b in enumerate(backbones, 1)) or "n/a"
    weights = summary.get("weights_id")
    if summary.get("non_clinical"):
        weights = f"{_fmt(weights)} (random initialisation, non-clinical)"
    rows = [
        ("Model id", _fmt(summary.get("model_id"))),
        ("Dataset", _fmt(summary.get("dataset"))),
        ("Backbones (concatenation order)", backbone_text),
        ("Feature dimension", _fmt(summary.get("feature_dim"))),
        ("Weights", _fmt(weights)),
        ("Image size", _fmt(summary.get("image_size"))),
        ("Classifier", _fmt(summary.get("classifier"))),
        ("Classifier parameters", _fmt_params(summary.get("classifier_params"))),
        ("Split", _fmt(summary.get("split"))),
        ("Seed", _fmt(summary.get("seed"))),
        ("Training cells", _fmt(summary.get("n_train"))),
        ("Test cells", _fmt(summary.get("n_test"))),
        ("Created at", _fmt(summary.get("created_at"))),
    ]
    return table([], rows)


def _accounting(summary: Mapping[str, Any]) -> tuple[Table, str]:
    counts = summary.get("counts") or {}
    names = ("found", "featurised", "quarantined", "duplicate")
    values = {name: _int_or_none(counts.get(name)) for name in names}
    rows = table(["", "count"], [(name, _fmt(values[name])) for name in names], numeric=1)
    parts = [values[n] for n in names[1:]]
    if values["found"] is None or any(v is None for v in parts):
        check = "The image accounting is incomplete, so found = featurised + quarantined + "
        check += "duplicate cannot be checked."
    elif values["found"] == sum(parts):
        check = (
            f"found = featurised + quarantined + duplicate: {values['found']} = "
            f"{parts[0]} + {parts[1]} + {parts[2]} (every image is accounted for)."
        )
    else:
        check = (
            f"MISMATCH: found ({values['found']}) != featurised + quarantined + duplicate "
            f"({sum(parts)}); {values['found'] - sum(parts)} image(s) are unaccounted for."
        )
    return rows, check


def _quarantine(summary: Mapping[str, Any]) -> tuple[Table | None, int]:
    items = list(summary.get("quarantined") or [])
    shown = [
        (_fmt(item.get("image_id")), _fmt(item.get("reason")))
        if isinstance(item, Mapping)
        else (_fmt(item), "n/a")
        for item in items[:MAX_QUARANTINE_SHOWN]
    ]
    more = max(0, len(items) - MAX_QUARANTINE_SHOWN)
    return (table(["image_id", "reason"], shown) if shown else None), more


def _roc(y_true: np.ndarray, scores: np.ndarray | None) -> tuple[dict | None, str]:
    """ROC points, or None with the reason there is no curve."""
    if scores is None:
        return None, "No ROC curve: the classifier produced no scores for the test cells."
    yt = np.asarray(y_true).ravel()
    if yt.size == 0:
        return None, "No ROC curve: the test set is empty."
    present = set(np.unique(yt).tolist())
    if present != {0, 1}:
        only = POSITIVE_LABEL if present == {1} else NEGATIVE_LABEL
        return None, f"No ROC curve: the test set holds only one class ({only})."
    return roc_points(yt, scores), ""


def _metrics(
    summary: Mapping[str, Any], y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None
) -> dict:
    metrics = summary.get("metrics")
    if metrics:
        return dict(metrics)
    # Fall back to recomputing so a summary written without metrics still gets a full report.
    return compute_metrics(y_true, y_pred, scores)


def _confusion(metrics: Mapping[str, Any]) -> Confusion:
    cm = metrics.get("confusion_matrix") or {}
    labels = tuple(str(label) for label in cm.get("labels") or [NEGATIVE_LABEL, POSITIVE_LABEL])
    matrix = tuple(tuple(int(v) for v in row) for row in (cm.get("matrix") or [[0, 0], [0, 0]]))
    return Confusion(labels, matrix)


def report_view(
    summary: Mapping[str, Any],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    risk: Mapping[str, Any] | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
    operating_point: Mapping[str, Any] | None = None,
    patient_level: Mapping[str, Any] | None = None,
) -> ReportView:
    """Compute what the evaluation report shows, plots included, once for both renderings."""
    metrics = _metrics(summary, y_true, y_pred, scores)
    confusion = _confusion(metrics)
    roc, no_roc_reason = _roc(y_true, scores)
    plots = [_plot(plot_confusion_matrix(confusion.matrix, confusion.labels), "Confusion matrix")]
    if roc is not None:
        figure = plot_roc(roc["fpr"], roc["tpr"], metrics.get("roc_auc"))
        plots.append(_plot(figure, "ROC curve"))
    accounting, accounting_check = _accounting(summary)
    quarantine, quarantine_more = _quarantine(summary)
    support = metrics.get("support") or {}
    return ReportView(
        title=TITLE,
        warning=NON_CLINICAL_WARNING if summary.get("non_clinical") else None,
        facts=_run_facts(summary),
        split=_fmt(summary.get("split")),
        metrics=table(
            ["Metric", "Value"],
            [(name, _fmt_metric(metrics.get(key))) for key, name in METRIC_ROWS],
            numeric=1,
        ),
        n_test=_fmt(metrics.get("n")),
        support=tuple(
            (label, _fmt(support.get(label))) for label in (POSITIVE_LABEL, NEGATIVE_LABEL)
        ),
        positive_label=POSITIVE_LABEL,
        confusion=confusion,
        plots=tuple(plots),
        no_roc_reason=no_roc_reason,
        risk=_risk_view(risk) if risk else None,
        operating_point=_operating_point_view(operating_point, patient_level),
        saved_model_first=bool(risk or operating_point or patient_level),
        examples=_examples_view(examples) if examples else None,
        accounting=accounting,
        accounting_check=accounting_check,
        quarantine=quarantine,
        quarantine_more=quarantine_more,
        versions=_versions(summary),
    )


def render_report(
    summary: dict,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    risk: Mapping[str, Any] | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
    *,
    operating_point: Mapping[str, Any] | None = None,
    patient_level: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Build the evaluation report; returns (markdown, html). The HTML is fully self-contained.

    `risk` (optional) adds the calibrated score and operating point: {"summary": the calibration
    summary, "y_true": test labels, "probabilities": calibrated test probabilities}.
    `examples` (optional) adds a gallery of test cells with their class activation maps:
    [{"kind": "TP" | "FP" | "FN", "image_id", "png_data_uri"}, optionally "subject_key",
    "file_name", "score", "threshold"] (present/explain).
    `operating_point` (optional) adds the saved model at its threshold on the held-out split,
    per cell and per patient, in learn/fit's form: {"threshold", "cells": {"sensitivity",
    "sensitivity_ci", "sensitivity_n", "specificity", ..., "n"}, "patients": learn/patient's
    patient_metrics() or None}. `patient_level` (optional) is that "patients" part on its own
    (it wins over operating_point["patients"]). Per-patient rows are never shown: they hold ids.
    The saved model's sections (risk, operating point, patients), where given, come first: they
    are what scores new images; the paper's plain classifier follows for comparison.
    """
    view = report_view(
        summary, y_true, y_pred, scores, risk, examples, operating_point, patient_level
    )
    return pages.render("report.md", report=view), pages.render("report.html", report=view)


# -- examples: test cells with their class activation maps -----------------------------------
EXAMPLES_TITLE = "Examples with their activation maps"
_EXAMPLE_KINDS = {
    "TP": "true positives (ALL called ALL)",
    "FP": "false positives (normal called ALL)",
    "FN": "false negatives (ALL missed)",
}


def example_caption(example: Mapping[str, Any]) -> str:
    """Kind and short image id, then what is known of the cell: subject key, file, score."""
    caption = f"{example.get('kind')} {str(example.get('image_id'))[:16]}"
    extras = []
    if example.get("subject_key"):
        extras.append(f"subject {example['subject_key']}")
    if example.get("file_name"):
        extras.append(str(example["file_name"]))
    if example.get("score") is not None:
        score = f"score {_fmt_metric(example['score'])}"
        if example.get("threshold") is not None:
            score += f" (threshold {_fmt_metric(example['threshold'])})"
        extras.append(score)
    return caption + (f": {', '.join(extras)}" if extras else "")


def _examples_view(examples: Sequence[Mapping[str, Any]]) -> ExamplesView:
    groups = []
    for kind, meaning in _EXAMPLE_KINDS.items():
        plots = tuple(
            Plot(str(e["png_data_uri"]), example_caption(e))
            for e in examples
            if e.get("kind") == kind
            # The page must stay self-contained: anything but an inline PNG is left out.
            and str(e.get("png_data_uri") or "").startswith(DATA_URI_PREFIX)
        )
        groups.append(ExampleGroup(kind, meaning, plots))
    rows = table(
        ["kind", "image_id"], [(_fmt(e.get("kind")), _fmt(e.get("image_id"))) for e in examples]
    )
    return ExamplesView(EXAMPLES_TITLE, tuple(groups), rows)


# -- the calibrated risk score and its operating point ---------------------------------------
RISK_TITLE = "Risk score and operating point"


def _risk_explanation(risk: Mapping[str, Any]) -> str:
    """What the calibrated score is (its section leads the report; the paper's metrics follow)."""
    grouping = "grouped by subject" if risk.get("grouping") == "subject" else "of images"
    note = (
        f" (not grouped by subject: {risk['grouping_note']})" if risk.get("grouping_note") else ""
    )
    return (
        f"The saved model gives a calibrated probability of ALL ({risk.get('method')} "
        f"calibration fitted on {risk.get('folds')} held-out folds of the training cells, "
        f"{grouping}{note}). A cell is flagged when its probability is at least the threshold "
        f"{_fmt_metric(risk.get('threshold'))}, chosen on those folds (out of fold, never on the "
        f"test split) to reach a sensitivity of {_fmt_metric(risk.get('target_sensitivity'))} for "
        "ALL. "
        + "These are the calibrated model at this threshold; the paper's plain classifier is "
        "measured further down."
    )


def _risk_rows(risk: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    validation, test = risk.get("validation") or {}, risk.get("test") or {}

    def cells(key: str) -> tuple[str, str]:
        return _fmt_metric(validation.get(key)), _fmt_metric(test.get(key))

    def counts(side: Mapping[str, Any]) -> str:
        return f"{_fmt(side.get('n_all'))} all / {_fmt(side.get('n_hem'))} hem"

    test_metrics = test.get("metrics") or {}
    return [
        ("Sensitivity (all flagged)", *cells("sensitivity")),
        ("Specificity (hem passed)", *cells("specificity")),
        ("Share of cells flagged", *cells("flagged_fraction")),
        ("Brier score (lower is better)", *cells("brier")),
        ("Precision at threshold", "n/a", _fmt_metric(test_metrics.get("precision"))),
        ("Accuracy at threshold", "n/a", _fmt_metric(test_metrics.get("accuracy"))),
        ("F1 at threshold", "n/a", _fmt_metric(test_metrics.get("f1"))),
        ("Cells", counts(validation), counts(test)),
    ]


def _risk_plots(risk: Mapping[str, Any]) -> list[Plot]:
    """ROC and PR of the calibrated test probabilities with the operating point, calibration
    curves and the confusion matrix at the threshold."""
    summary = risk["summary"]
    test = summary.get("test") or {}
    confusion = _confusion(test.get("metrics") or {})
    plots = [
        _plot(
            plot_confusion_matrix(confusion.matrix, confusion.labels),
            f"Confusion matrix at threshold {_fmt_metric(summary.get('threshold'))}",
        )
    ]
    curves = {
        name: points
        for name, points in (
            ("validation (out of fold)", (summary.get("validation") or {}).get("reliability")),
            ("test", test.get("reliability")),
        )
        if points
    }
    if curves:
        brier = _fmt_metric(test.get("brier"))
        plots.append(_plot(plot_reliability(curves), f"Calibration (test Brier {brier})"))
    y_true = np.asarray(risk["y_true"]).ravel()
    probabilities = np.asarray(risk["probabilities"]).ravel()
    if set(np.unique(y_true).tolist()) == {0, 1}:
        sensitivity, specificity = test.get("sensitivity"), test.get("specificity")
        precision = (test.get("metrics") or {}).get("precision")
        roc_point = pr_point = None
        if sensitivity is not None and specificity is not None:
            roc_point = (1 - specificity, sensitivity)
            pr_point = (sensitivity, precision) if precision is not None else None
        roc = roc_points(y_true, probabilities)
        auc = (test.get("metrics") or {}).get("roc_auc")
        plots.append(
            _plot(
                plot_roc(roc["fpr"], roc["tpr"], auc, roc_point),
                "ROC of the calibrated score, operating point marked",
            )
        )
        pr = pr_points(y_true, probabilities)
        figure = plot_precision_recall(
            pr["recall"], pr["precision"], float(y_true.mean()), pr_point
        )
        plots.append(_plot(figure, "Precision-recall of the calibrated score, operating point"))
    return plots


def _rate(value: Any, interval: Any, n: Any) -> str:
    """A rate as "0.9500 [0.9000, 0.9800] (n=40)": the interval and n when known."""
    if value is None:
        return "n/a" + (f" (n={n})" if n is not None else "")
    text = _fmt_metric(value)
    if interval and len(interval) == 2 and None not in interval:
        text += f" [{_fmt_metric(interval[0])}, {_fmt_metric(interval[1])}]"
    return text + (f" (n={n})" if n is not None else "")


OPERATING_POINT_TITLE = "At the operating point: cells and patients"


def _operating_point_view(
    operating_point: Mapping[str, Any] | None, patient_level: Mapping[str, Any] | None
) -> OperatingPointView | None:
    cells = (operating_point or {}).get("cells") or {}
    patients = patient_level or (operating_point or {}).get("patients") or {}
    if not cells and not patients:
        return None
    metrics = patients.get("metrics") or {}
    support = patients.get("support") or {}

    def cell_rate(key: str) -> str:
        return _rate(cells.get(key), cells.get(f"{key}_ci"), cells.get(f"{key}_n"))

    def patient_rate(key: str, label: str) -> str:
        m = metrics.get(key) or {}
        return _rate(m.get("value"), (m.get("low"), m.get("high")), support.get(label))

    rows = [
        (
            "Sensitivity (ALL flagged)",
            _rate(
                cells.get("sensitivity"), cells.get("sensitivity_ci"), cells.get("sensitivity_n")
            ),
            patient_rate("sensitivity", POSITIVE_LABEL),
        ),
        (
            "Specificity (normal passed)",
            _rate(
                cells.get("specificity"), cells.get("specificity_ci"), cells.get("specificity_n")
            ),
            patient_rate("specificity", NEGATIVE_LABEL),
        ),
        ("Count", _fmt(cells.get("n")), _fmt(patients.get("n_patients"))),
    ]
    notes = []
    threshold = (operating_point or {}).get("threshold")
    if threshold is not None:
        notes.append(f"Cell threshold {_fmt_metric(threshold)} on the calibrated probability.")
    if patients:
        notes.append(
            f"A patient is flagged when the share of their cells flagged reaches the patient "
            f"threshold chosen on training patients; {_fmt(patients.get('n_cells'))} test cells "
            f"from {_fmt(patients.get('n_patients'))} patients. Intervals: 95% bootstrap, "
            "resampling patients."
        )
    else:
        notes.append("No patient-level result: the test cells carry no subject ids.")
    confusion = _confusion(patients) if patients.get("confusion_matrix") else None
    return OperatingPointView(
        OPERATING_POINT_TITLE,
        table(["", "cells", "patients"], rows, numeric=2),
        confusion,
        tuple(notes),
    )


def _risk_view(risk: Mapping[str, Any]) -> RiskView:
    summary = risk["summary"]
    return RiskView(
        title=RISK_TITLE,
        explanation=_risk_explanation(summary),
        table=table(["", "validation (out of fold)", "test"], _risk_rows(summary), numeric=2),
        confusion=_confusion((summary.get("test") or {}).get("metrics") or {}),
        plots=tuple(_risk_plots(risk)),
    )


# -- the experiments report ------------------------------------------------------------------
EXPERIMENTS_TITLE = "leukoflow experiments"


@dataclass(frozen=True)
class EvaluationView:
    """One evaluation's grid (the paper's random split, or subject-grouped folds)."""

    title: str
    method: str
    note: str | None
    table: Table


@dataclass(frozen=True)
class ExperimentsView:
    title: str
    warning: str | None
    facts: Table
    evaluations: tuple[EvaluationView, ...]
    ranking: str
    gap_explanation: str
    gap: Table | None
    gap_plot: Plot | None
    versions: Table | None


def _experiment_facts(summary: Mapping[str, Any]) -> Table:
    augment = "on: hflip, vflip, rotation (training side only)" if summary.get("augment") else "off"
    weights = _fmt(summary.get("weights_id"))
    if summary.get("non_clinical"):
        weights += " (random initialisation, non-clinical)"
    rows = [
        ("Experiment id", _fmt(summary.get("experiment_id"))),
        ("Dataset", _fmt(summary.get("dataset"))),
        ("Images (labelled, with features)", _fmt(summary.get("n_images"))),
        ("Backbones", ", ".join(summary.get("backbones") or []) or "n/a"),
        ("Classifiers", ", ".join(summary.get("classifiers") or []) or "n/a"),
        ("Image size", _fmt(summary.get("image_size"))),
        ("Weights", weights),
        ("Augmentation", augment),
        ("Seed", _fmt(summary.get("seed"))),
        ("Code version", _fmt(summary.get("code_version"))),
        ("Created at", _fmt(summary.get("created_at"))),
    ]
    return table([], rows)


def _evaluation_view(summary: Mapping[str, Any], evaluation: Mapping[str, Any]) -> EvaluationView:
    header, rows, best = ex.display_table(ex.results_for(summary["cells"], evaluation["name"]))
    rows = [[f"\u2605 {row[0]}" if i == best else row[0], *row[1:]] for i, row in enumerate(rows)]
    note = None
    if evaluation["name"] == "subject":
        how = ", resampling subjects" if evaluation["grouping"] == "subject" else ""
        method = f"Mean ± std over folds, then [bootstrap 95% interval{how}]."
        if evaluation["grouping"] != "subject":
            note = ex.NO_SUBJECTS_NOTE.format(why=evaluation["note"])
    else:
        method = "Test-set value [bootstrap 95% interval, resampling cells]."
    return EvaluationView(
        title=evaluation["label"].capitalize(),
        method=method,
        note=note,
        table=table(header, rows, numeric=len(header) - 2, best=best),
    )


def experiments_view(summary: Mapping[str, Any]) -> ExperimentsView:
    """What the experiments page shows: a table per evaluation, then random vs. subject split."""
    gap = ex.comparison(summary.get("cells") or [])
    header = ["Features", "Classifier", "Accuracy, random", "Accuracy, subject", "Gap"]
    header += ["F1, random", "F1, subject", "F1 gap"]
    rows = [
        [
            row["feature_set"],
            row["classifier"],
            *(
                _fmt_metric(row[f"{key}_{side}"])
                for key in ("accuracy", "f1")
                for side in ("random", "subject", "gap")
            ),
        ]
        for row in gap
    ]
    points = [
        (f"{r['feature_set']} {r['classifier']}", r["accuracy_random"], r["accuracy_subject"])
        for r in gap
        if r["accuracy_random"] is not None and r["accuracy_subject"] is not None
    ]
    gap_plot = (
        _plot(plot_split_gap(points), "Accuracy per cell: random split (x) vs. subject folds (y)")
        if points
        else None
    )
    return ExperimentsView(
        title=EXPERIMENTS_TITLE,
        warning=summary.get("note") or None,
        facts=_experiment_facts(summary),
        evaluations=tuple(_evaluation_view(summary, e) for e in summary.get("evaluations") or []),
        ranking=f"\u2605 best cell: highest {ex.RANKING_METRIC}, then F1.",
        gap_explanation=ex.SPLIT_GAP_EXPLANATION,
        gap=table(header, rows, numeric=len(header) - 2) if gap else None,
        gap_plot=gap_plot,
        versions=_versions(summary),
    )


def render_experiments_html(summary: Mapping[str, Any]) -> str:
    """The experiment grid as a self-contained HTML page: a table per evaluation, best marked."""
    return pages.render("experiments.html", page=experiments_view(summary))
