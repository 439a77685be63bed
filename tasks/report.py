"""Evaluation report for one trained model: Markdown plus a self-contained HTML page.

The HTML must open offline from a laptop or an S3 console download, so it carries its CSS inline
and its plots as base64 PNG data URIs, with no scripts, external links or web fonts. Plots use
`matplotlib.figure.Figure` objects directly (never pyplot), so reports can be rendered from worker
threads without touching global state or needing a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from leukoflow.tasks import experiments as ex
from leukoflow.tasks.evaluate import (
    NEGATIVE_LABEL,
    POSITIVE_LABEL,
    compute_metrics,
    pr_points,
    roc_points,
)

TITLE = "leukoflow evaluation report"
NON_CLINICAL_WARNING = (
    "NOT CLINICALLY MEANINGFUL: features come from random-initialised networks (--weights none); "
    "these numbers only show that the pipeline runs."
)
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

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
  max-width: 960px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f3f4f6; padding: 0 0.25em; border-radius: 3px; }
.warning { background: #fde8e8; border: 2px solid #c81e1e; color: #7f1d1d; padding: 0.8em 1em;
  font-weight: bold; font-size: 1.1em; border-radius: 4px; margin-bottom: 1em; }
.note { background: #fff8e1; border-left: 4px solid #f0b429; padding: 0.5em 0.8em; }
.muted { color: #666; font-size: 0.9em; }
figure { margin: 0.8em 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; text-align: center; }
tr.best th, tr.best td { background: #e6f4ea; font-weight: bold; }
"""


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


def _md(text: Any) -> str:
    # Markdown is often rendered to HTML, so escape markup too; pipes would break table cells.
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _h(text: Any) -> str:
    return html.escape(str(text))


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- report content --------------------------------------------------------------------------
def _run_facts(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    backbones = list(summary.get("backbones") or [])
    backbone_text = " + ".join(f"{i}. {b}" for i, b in enumerate(backbones, 1)) or "n/a"
    weights = summary.get("weights_id")
    if summary.get("non_clinical"):
        weights = f"{_fmt(weights)} (random initialisation, non-clinical)"
    return [
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


def _accounting(summary: Mapping[str, Any]) -> tuple[list[tuple[str, str]], str]:
    counts = summary.get("counts") or {}
    names = ("found", "featurised", "quarantined", "duplicate")
    values = {name: _int_or_none(counts.get(name)) for name in names}
    rows = [(name, _fmt(values[name])) for name in names]
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


def _quarantine(summary: Mapping[str, Any]) -> tuple[list[tuple[str, str]], int]:
    items = list(summary.get("quarantined") or [])
    shown = [
        (_fmt(item.get("image_id")), _fmt(item.get("reason")))
        if isinstance(item, Mapping)
        else (_fmt(item), "n/a")
        for item in items[:MAX_QUARANTINE_SHOWN]
    ]
    return shown, max(0, len(items) - MAX_QUARANTINE_SHOWN)


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


def _confusion(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[int]]]:
    cm = metrics.get("confusion_matrix") or {}
    labels = list(cm.get("labels") or [NEGATIVE_LABEL, POSITIVE_LABEL])
    matrix = [[int(v) for v in row] for row in (cm.get("matrix") or [[0, 0], [0, 0]])]
    return labels, matrix


@dataclass(frozen=True)
class _ReportContent:
    """What both renderings of the evaluation report show, computed once."""

    non_clinical: bool
    facts: list[tuple[str, str]]
    metrics: Mapping[str, Any]
    labels: list[str]
    matrix: list[list[int]]
    roc: dict | None
    no_roc_reason: str
    split: Any
    accounting_rows: list[tuple[str, str]]
    accounting_check: str
    quarantine_rows: list[tuple[str, str]]
    quarantine_more: int
    versions: Mapping[str, Any]


def _report_content(
    summary: Mapping[str, Any], y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None
) -> _ReportContent:
    metrics = _metrics(summary, y_true, y_pred, scores)
    labels, matrix = _confusion(metrics)
    roc, no_roc_reason = _roc(y_true, scores)
    accounting_rows, accounting_check = _accounting(summary)
    quarantine_rows, quarantine_more = _quarantine(summary)
    return _ReportContent(
        non_clinical=bool(summary.get("non_clinical")),
        facts=_run_facts(summary),
        metrics=metrics,
        labels=labels,
        matrix=matrix,
        roc=roc,
        no_roc_reason=no_roc_reason,
        split=summary.get("split"),
        accounting_rows=accounting_rows,
        accounting_check=accounting_check,
        quarantine_rows=quarantine_rows,
        quarantine_more=quarantine_more,
        versions=summary.get("package_versions") or {},
    )


def render_report(
    summary: dict,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    risk: Mapping[str, Any] | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[str, str]:
    """Build the evaluation report; returns (markdown, html). The HTML is fully self-contained.

    `risk` (optional) adds the calibrated score and operating point: {"summary": the calibration
    summary, "y_true": test labels, "probabilities": calibrated test probabilities}.
    `examples` (optional) adds a gallery of test cells with their class activation maps:
    [{"kind": "TP" | "FP" | "FN", "image_id", "png_data_uri"}] (tasks/explain).
    """
    content = _report_content(summary, y_true, y_pred, scores)
    markdown = _render_markdown(content, _risk_markdown(risk["summary"]) if risk else [])
    confusion = figure_to_data_uri(plot_confusion_matrix(content.matrix, content.labels))
    plots = [(confusion, "Confusion matrix")]
    if content.roc is not None:
        fpr, tpr, auc = content.roc["fpr"], content.roc["tpr"], content.metrics.get("roc_auc")
        plots.append((figure_to_data_uri(plot_roc(fpr, tpr, auc)), "ROC curve"))
    html_text = _render_html(
        content,
        plots=plots,
        risk_html=_risk_html(risk) if risk else [],
        examples_html=_examples_html(examples) if examples else [],
    )
    if examples:
        markdown += "\n".join(_examples_markdown(examples))
    return markdown, html_text


# -- examples: test cells with their class activation maps -----------------------------------
EXAMPLES_TITLE = "Examples with their activation maps"
_EXAMPLE_KINDS = {
    "TP": "true positives (ALL called ALL)",
    "FP": "false positives (normal called ALL)",
    "FN": "false negatives (ALL missed)",
}


def _examples_markdown(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [f"## {EXAMPLES_TITLE}", "", "| kind | image_id |", "|---|---|"]
    lines += [f"| {_md(e.get('kind'))} | {_md(e.get('image_id'))} |" for e in examples]
    return lines + ["", "_The maps are in the HTML report._", ""]


def _examples_html(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    body = [f"<h2>{_h(EXAMPLES_TITLE)}</h2>"]
    body.append(
        '<p class="muted">Test cells with the class activation map of each CNN (red: towards '
        "ALL, blue: towards normal, relative to the average training cell) and, for "
        "<code>color_morphology</code>, the segmentation and the features that moved the score "
        "most. See docs/explanations.md.</p>"
    )
    for kind, meaning in _EXAMPLE_KINDS.items():
        chosen = [e for e in examples if e.get("kind") == kind]
        body.append(f"<h3>{_h(kind)}: {_h(meaning)}</h3>")
        if not chosen:
            body.append("<p>None in the test split.</p>")
        for example in chosen:
            uri = str(example.get("png_data_uri") or "")
            if not uri.startswith("data:image/png;base64,"):  # the page must stay self-contained
                continue
            caption = f"{kind} {str(example.get('image_id'))[:16]}"
            body.append(_figure_html(uri, caption))
    return body


# -- the calibrated risk score and its operating point ---------------------------------------
RISK_TITLE = "Risk score and operating point"


def _risk_explanation(risk: Mapping[str, Any]) -> str:
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
        "ALL. The metrics above are the paper's plain classifier; those below are the calibrated "
        "model at this threshold."
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


def _risk_markdown(risk: Mapping[str, Any]) -> list[str]:
    lines = [f"## {RISK_TITLE}", "", _md(_risk_explanation(risk)), ""]
    lines += ["| | validation (out of fold) | test |", "|---|---:|---:|"]
    lines += [f"| {a} | {_md(b)} | {_md(c)} |" for a, b, c in _risk_rows(risk)]
    labels, matrix = _confusion((risk.get("test") or {}).get("metrics") or {})
    lines += ["", "Confusion matrix on the test split at the threshold:", ""]
    lines += ["| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for label, row in zip(labels, matrix, strict=False):
        lines.append(f"| **{_md(label)}** | " + " | ".join(str(v) for v in row) + " |")
    return lines + [""]


def _risk_plots(risk: Mapping[str, Any]) -> list[tuple[str, str]]:
    """ROC and PR of the calibrated test probabilities with the operating point, calibration
    curves and the confusion matrix at the threshold."""
    summary = risk["summary"]
    test = summary.get("test") or {}
    labels, matrix = _confusion(test.get("metrics") or {})
    plots = [
        (
            figure_to_data_uri(plot_confusion_matrix(matrix, labels)),
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
        plots.append(
            (figure_to_data_uri(plot_reliability(curves)), f"Calibration (test Brier {brier})")
        )
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
            (
                figure_to_data_uri(plot_roc(roc["fpr"], roc["tpr"], auc, roc_point)),
                "ROC of the calibrated score, operating point marked",
            )
        )
        pr = pr_points(y_true, probabilities)
        prevalence = float(y_true.mean())
        figure = plot_precision_recall(pr["recall"], pr["precision"], prevalence, pr_point)
        plots.append(
            (
                figure_to_data_uri(figure),
                "Precision-recall of the calibrated score, operating point",
            )
        )
    return plots


def _risk_html(risk: Mapping[str, Any]) -> list[str]:
    summary = risk["summary"]
    body = [f"<h2>{_h(RISK_TITLE)}</h2>", f'<p class="note">{_h(_risk_explanation(summary))}</p>']
    body.append(_html_table(["", "validation (out of fold)", "test"], _risk_rows(summary), 2))
    for uri, caption in _risk_plots(risk):
        body.append(_figure_html(uri, caption))
    return body


def _split_sentence(split: Any, code: Callable[[str], str]) -> str:
    """Why the split matters; `code` formats a split name (Markdown backticks or HTML <code>)."""
    return (
        f"This run used the {code(_fmt(split))} split. Under the {code('random')} split, cells "
        "of the same subject can fall on both sides of the train/test split, which inflates "
        f"accuracy; the {code('subject')} split keeps each subject on one side."
    )


def _render_markdown(c: _ReportContent, risk_lines: Sequence[str] = ()) -> str:
    lines: list[str] = []
    if c.non_clinical:
        lines += [f"> **WARNING** {NON_CLINICAL_WARNING}", ""]
    lines += [f"# {TITLE}", ""]

    lines += ["## Run", "", "| | |", "|---|---|"]
    lines += [f"| {_md(k)} | {_md(v)} |" for k, v in c.facts]
    # Inside a code span Markdown shows text literally, so only backticks need removing.
    lines += ["", _split_sentence(c.split, lambda name: f"`{name.replace('`', '')}`"), ""]

    lines += ["## Metrics", "", "| Metric | Value |", "|---|---:|"]
    lines += [f"| {name} | {_fmt_metric(c.metrics.get(key))} |" for key, name in METRIC_ROWS]
    support = c.metrics.get("support") or {}
    lines += [
        "",
        f"Test cells: {_fmt(c.metrics.get('n'))} ({POSITIVE_LABEL}: "
        f"{_fmt(support.get(POSITIVE_LABEL))}, {NEGATIVE_LABEL}: "
        f"{_fmt(support.get(NEGATIVE_LABEL))}). Precision, recall and F1 are for the "
        f"`{POSITIVE_LABEL}` (blast) class.",
        "",
    ]

    lines += ["## Confusion matrix", "", "| true \\ predicted | " + " | ".join(c.labels) + " |"]
    lines += ["|---|" + "---:|" * len(c.labels)]
    for label, row in zip(c.labels, c.matrix, strict=False):
        lines.append(f"| **{_md(label)}** | " + " | ".join(str(v) for v in row) + " |")
    lines.append("")
    if c.no_roc_reason:
        lines += [c.no_roc_reason, ""]
    lines += list(risk_lines)

    lines += ["## Images", "", "| | count |", "|---|---:|"]
    lines += [f"| {k} | {_md(v)} |" for k, v in c.accounting_rows]
    lines += ["", _md(c.accounting_check), ""]
    lines += _quarantine_markdown(c.quarantine_rows, c.quarantine_more)

    if c.versions:
        lines += ["## Package versions", "", "| package | version |", "|---|---|"]
        lines += [f"| {_md(k)} | {_md(v)} |" for k, v in c.versions.items()]
        lines.append("")
    lines += ["_Plots (confusion matrix heatmap, ROC curve) are in the HTML report._", ""]
    return "\n".join(lines)


def _quarantine_markdown(rows: list[tuple[str, str]], more: int) -> list[str]:
    lines = ["### Quarantined images", ""]
    if not rows:
        return lines + ["None.", ""]
    lines += ["| image_id | reason |", "|---|---|"]
    lines += [f"| {_md(image_id)} | {_md(reason)} |" for image_id, reason in rows]
    if more:
        lines += ["", f"... and {more} more."]
    return lines + [""]


def _figure_html(uri: str, caption: str) -> str:
    """An embedded image (a data: URI: the page stays self-contained) with its caption."""
    return (
        f'<figure><img src="{_h(uri)}" alt="{_h(caption)}">'
        f"<figcaption>{_h(caption)}</figcaption></figure>"
    )


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: int = 0) -> str:
    """A table of escaped cells; the last `numeric` columns are right-aligned."""
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{_h(c)}</th>" for c in header) + "</tr>")
    for row in rows:
        # The first cell names the row; the rest are data cells.
        cells = [f"<th>{_h(row[0])}</th>"]
        for i, cell in enumerate(row[1:], start=1):
            cls = ' class="num"' if i >= len(row) - numeric else ""
            cells.append(f"<td{cls}>{_h(cell)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _render_html(
    c: _ReportContent,
    plots: list[tuple[str, str]],
    risk_html: Sequence[str] = (),
    examples_html: Sequence[str] = (),
) -> str:
    body: list[str] = []
    if c.non_clinical:
        body.append(f'<div class="warning">{_h(NON_CLINICAL_WARNING)}</div>')
    body.append(f"<h1>{_h(TITLE)}</h1>")

    body.append("<h2>Run</h2>")
    body.append(_html_table([], c.facts))
    split_text = _split_sentence(c.split, lambda name: f"<code>{_h(name)}</code>")
    body.append(f'<p class="note">{split_text}</p>')

    body.append("<h2>Metrics</h2>")
    metric_rows = [(name, _fmt_metric(c.metrics.get(key))) for key, name in METRIC_ROWS]
    body.append(_html_table(["Metric", "Value"], metric_rows, numeric=1))
    support = c.metrics.get("support") or {}
    body.append(
        f'<p class="muted">Test cells: {_h(_fmt(c.metrics.get("n")))} '
        f"({_h(POSITIVE_LABEL)}: {_h(_fmt(support.get(POSITIVE_LABEL)))}, "
        f"{_h(NEGATIVE_LABEL)}: {_h(_fmt(support.get(NEGATIVE_LABEL)))}). Precision, recall and "
        f"F1 are for the <code>{_h(POSITIVE_LABEL)}</code> (blast) class.</p>"
    )

    body.append("<h2>Confusion matrix</h2>")
    cm_rows = [
        [label, *(str(v) for v in row)] for label, row in zip(c.labels, c.matrix, strict=False)
    ]
    body.append(_html_table(["true \\ predicted", *c.labels], cm_rows, numeric=len(c.labels)))
    for uri, caption in plots:
        body.append(_figure_html(uri, caption))
    if c.no_roc_reason:
        body.append(f"<p>{_h(c.no_roc_reason)}</p>")
    body.extend(risk_html)
    body.extend(examples_html)

    body.append("<h2>Images</h2>")
    body.append(_html_table(["", "count"], c.accounting_rows, numeric=1))
    body.append(f"<p>{_h(c.accounting_check)}</p>")
    body.append("<h3>Quarantined images</h3>")
    if c.quarantine_rows:
        body.append(_html_table(["image_id", "reason"], c.quarantine_rows))
        if c.quarantine_more:
            body.append(f"<p>... and {c.quarantine_more} more.</p>")
    else:
        body.append("<p>None.</p>")

    if c.versions:
        body.append("<h2>Package versions</h2>")
        body.append(
            _html_table(["package", "version"], [(k, _fmt(v)) for k, v in c.versions.items()])
        )

    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_h(TITLE)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# -- the experiments report ------------------------------------------------------------------
EXPERIMENTS_TITLE = "leukoflow experiments"


def _experiment_facts(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    augment = "on: hflip, vflip, rotation (training side only)" if summary.get("augment") else "off"
    weights = _fmt(summary.get("weights_id"))
    if summary.get("non_clinical"):
        weights += " (random initialisation, non-clinical)"
    return [
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


def _grid_table_html(header: Sequence[str], rows: Sequence[Sequence[str]], best: int | None) -> str:
    parts = ["<table>", "<tr>" + "".join(f"<th>{_h(c)}</th>" for c in header) + "</tr>"]
    for i, row in enumerate(rows):
        css = ' class="best"' if i == best else ""
        mark = "\u2605 " if i == best else ""
        cells = [f"<th>{_h(mark + row[0])}</th>", f"<td>{_h(row[1])}</td>"]
        cells += [f'<td class="num">{_h(c)}</td>' for c in row[2:]]
        parts.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def render_experiments_html(summary: Mapping[str, Any]) -> str:
    """The experiment grid as a self-contained HTML page: a table per evaluation, best marked."""
    body: list[str] = []
    if summary.get("note"):
        body.append(f'<div class="warning">{_h(summary["note"])}</div>')
    body += [f"<h1>{_h(EXPERIMENTS_TITLE)}</h1>", _html_table([], _experiment_facts(summary))]
    for evaluation in summary.get("evaluations") or []:
        results = ex.results_for(summary["cells"], evaluation["name"])
        header, rows, best = ex.display_table(results)
        body.append(f"<h2>{_h(evaluation['label'].capitalize())}</h2>")
        if evaluation["name"] == "subject":
            how = ", resampling subjects" if evaluation["grouping"] == "subject" else ""
            body.append(f"<p>Mean ± std over folds, then [bootstrap 95% interval{how}].</p>")
            if evaluation["grouping"] != "subject":
                note = ex.NO_SUBJECTS_NOTE.format(why=evaluation["note"])
                body.append(f'<p class="note">{_h(note)}</p>')
        else:
            body.append("<p>Test-set value [bootstrap 95% interval, resampling cells].</p>")
        body.append(_grid_table_html(header, rows, best))
        body.append(
            f'<p class="muted">\u2605 best cell: highest {_h(ex.RANKING_METRIC)}, then F1.</p>'
        )
    gap = ex.comparison(summary.get("cells") or [])
    if gap:
        body += [
            "<h2>Random split vs. subject split</h2>",
            f"<p>{_h(ex.SPLIT_GAP_EXPLANATION)}</p>",
        ]
        header = ["Features", "Classifier", "Accuracy, random", "Accuracy, subject", "Gap"]
        header += ["F1, random", "F1, subject", "F1 gap"]
        rows = [
            [
                row["feature_set"],
                row["classifier"],
                *(
                    text
                    for key in ("accuracy", "f1")
                    for text in (
                        _fmt_metric(row[f"{key}_random"]),
                        _fmt_metric(row[f"{key}_subject"]),
                        _fmt_metric(row[f"{key}_gap"]),
                    )
                ),
            ]
            for row in gap
        ]
        body.append(_grid_table_html(header, rows, None))
        points = [
            (f"{r['feature_set']} {r['classifier']}", r["accuracy_random"], r["accuracy_subject"])
            for r in gap
            if r["accuracy_random"] is not None and r["accuracy_subject"] is not None
        ]
        if points:
            uri = figure_to_data_uri(plot_split_gap(points))
            caption = "Accuracy per cell: random split (x) vs. subject folds (y)"
            body.append(_figure_html(uri, caption))
    versions = summary.get("package_versions") or {}
    if versions:
        body.append("<h2>Package versions</h2>")
        body.append(
            _html_table(["package", "version"], [(k, _fmt(v)) for k, v in versions.items()])
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_h(EXPERIMENTS_TITLE)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
