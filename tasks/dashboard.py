"""The ops dashboard: one self-contained HTML page of the nightly sweeps.

Like the evaluation report it must open offline (a laptop, an S3 console download): inline CSS,
plots as base64 PNG data URIs, no scripts, links or web fonts. It reads only the runs table, where
every sweep's row carries its night's totals, drift and subject table in `details`, and the sweep
lease (to tell an interrupted sweep from a running one). `nightly_series` and `render_dashboard`
are pure; `write_dashboard` does the reading and writing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from matplotlib.figure import Figure

from leukoflow.tasks.lease import SWEEP_LEASE, lease_location, read_lease
from leukoflow.tasks.report import figure_to_data_uri
from leukoflow.tasks.score import short
from leukoflow.tasks.storage import Location, write_text_atomic
from leukoflow.tasks.tables import read_runs

TITLE = "leukoflow nightly sweeps"
RECENT_RUNS = 20

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
  max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fde8e8; font-weight: bold; }
.warning { background: #fde8e8; border: 2px solid #c81e1e; color: #7f1d1d; padding: 0.7em 1em;
  font-weight: bold; border-radius: 4px; }
.muted { color: #666; font-size: 0.9em; }
.plots { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; }
figure img { border: 1px solid #eee; width: 520px; }
figcaption { color: #555; font-size: 0.9em; text-align: center; }
"""


# -- reading ---------------------------------------------------------------------------------
def load_sweeps(store: Location) -> list[dict]:
    """Every sweep's run row, oldest first, with `details` parsed."""
    runs = read_runs(store).to_pylist()
    sweeps = [
        dict(r, details=json.loads(r["details"] or "{}")) for r in runs if r["kind"] == "score"
    ]
    return sorted(sweeps, key=lambda r: r["started_at"])


def run_state(run: dict, live_run_id: str | None) -> str:
    """completed | failed | running (holds the lease now) | interrupted (killed mid-sweep)."""
    if run["outcome"] != "running":
        return run["outcome"]
    return "running" if run["run_id"] == live_run_id else "interrupted"


# -- nights ----------------------------------------------------------------------------------
def nightly_series(sweeps: Sequence[dict], limit: int) -> list[dict]:
    """One point per night: its totals (from its last completed sweep) and its runs' signals."""
    by_night: dict[str, list[dict]] = {}
    for run in sweeps:
        by_night.setdefault(run["details"].get("date", "?"), []).append(run)
    nights = []
    for night in sorted(by_night)[-limit:] if limit > 0 else []:
        runs = by_night[night]
        done = [r for r in runs if r["outcome"] == "completed"]
        totals = done[-1]["details"].get("night", {}) if done else {}
        scoring = [r for r in done if r["images_scored"]]
        seconds = sum(r["details"].get("seconds") or 0 for r in scoring)
        drifts = [r["details"]["drift"] for r in scoring if r["details"].get("drift")]
        nights.append(
            {
                "date": night,
                "runs": len(runs),
                "cells_scored": totals.get("cells_scored", 0),
                "cells_flagged": totals.get("cells_flagged", 0),
                "subjects": totals.get("subjects", 0),
                "subjects_flagged": totals.get("subjects_flagged", 0),
                "quarantined_new": sum(
                    r["details"].get("counts", {}).get("quarantined_new", 0) for r in done
                ),
                "images_per_second": (
                    round(sum(r["images_scored"] for r in scoring) / seconds, 3)
                    if seconds
                    else None
                ),
                "feature_shift": _max(d.get("feature_shift") for d in drifts),
                "score_ks": _max(d.get("score_ks") for d in drifts),
                "drift_warning": any(d.get("warning") for d in drifts),
                "thresholds": drifts[-1].get("thresholds") if drifts else None,
            }
        )
    return nights


def _max(values) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


# -- plots -----------------------------------------------------------------------------------
def _axes(title: str, nights: Sequence[dict]):
    fig = Figure(figsize=(5.6, 2.9))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    positions = list(range(len(nights)))
    step = max(1, len(nights) // 10)  # at most ~10 date labels
    ax.set_xticks(
        positions[::step], [n["date"] for n in nights][::step], rotation=30, ha="right", fontsize=7
    )
    ax.grid(axis="y", alpha=0.3)
    return fig, ax, positions


def plot_counts(nights: Sequence[dict], key: str, title: str, color: str) -> Figure:
    """Bars of one per-night count."""
    fig, ax, x = _axes(title, nights)
    ax.bar(x, [n[key] for n in nights], color=color)
    return fig


def plot_flagged(nights: Sequence[dict]) -> Figure:
    """Flagged cells and flagged subjects side by side, per night."""
    fig, ax, x = _axes("Flagged cells and subjects per night", nights)
    width = 0.4
    ax.bar(
        [p - width / 2 for p in x],
        [n["cells_flagged"] for n in nights],
        width,
        label="flagged cells",
        color="#c0504d",
    )
    ax.bar(
        [p + width / 2 for p in x],
        [n["subjects_flagged"] for n in nights],
        width,
        label="flagged subjects",
        color="#7f1d1d",
    )
    ax.legend(fontsize=7)
    return fig


def plot_throughput(nights: Sequence[dict]) -> Figure:
    """Images scored per second of sweep, on nights that scored any."""
    fig, ax, x = _axes("Throughput (images scored per second of sweep)", nights)
    points = [(p, n["images_per_second"]) for p, n in zip(x, nights, strict=True)]
    shown = [(p, v) for p, v in points if v is not None]
    if shown:
        ax.plot(*zip(*shown, strict=True), marker="o", color="#4f81bd")
    ax.set_ylim(bottom=0)
    return fig


def plot_drift(nights: Sequence[dict]) -> Figure:
    """Both drift measures with their thresholds dashed; warning nights shaded red."""
    fig, ax, x = _axes("Drift against the model's reference (red: warning)", nights)
    for key, label, color in (
        ("feature_shift", "feature shift (mean |z|)", "#4f81bd"),
        ("score_ks", "score KS distance", "#9bbb59"),
    ):
        shown = [(p, n[key]) for p, n in zip(x, nights, strict=True) if n[key] is not None]
        if shown:
            ax.plot(*zip(*shown, strict=True), marker="o", label=label, color=color)
    thresholds = next((n["thresholds"] for n in reversed(nights) if n["thresholds"]), None)
    if thresholds:
        ax.axhline(thresholds["feature_shift"], color="#4f81bd", linestyle="--", linewidth=0.8)
        ax.axhline(thresholds["score_ks"], color="#9bbb59", linestyle="--", linewidth=0.8)
    warned = [p for p, n in zip(x, nights, strict=True) if n["drift_warning"]]
    for p in warned:
        ax.axvspan(p - 0.4, p + 0.4, color="#c81e1e", alpha=0.2)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return fig


# -- the page --------------------------------------------------------------------------------
def render_dashboard(
    nights: Sequence[dict],
    sweeps: Sequence[dict],
    live_run_id: str | None,
    store_uri: str,
    generated_at: datetime,
) -> str:
    """The whole page as one HTML string (no network: data URIs only)."""
    body = [
        f"<h1>{TITLE}</h1>",
        f"<p class='muted'>store {_h(store_uri)}; generated "
        f"{generated_at.strftime('%Y-%m-%d %H:%M UTC')}</p>",
    ]
    latest = next((r for r in reversed(sweeps) if r["outcome"] == "completed"), None)
    if latest and latest["details"].get("non_clinical"):
        body.append(
            "<p class='warning'>NOT CLINICALLY MEANINGFUL: the latest model uses "
            "features of random-initialised networks (--weights none).</p>"
        )
    if not nights:
        body.append("<p>No nightly sweeps in this store yet (<code>leukoflow score</code>).</p>")
    else:
        body += ["<h2>Over nights</h2>", "<div class='plots'>", *_plots(nights), "</div>"]
    if latest:
        body += _subject_section(latest)
    if sweeps:
        body += _runs_section(sweeps, live_run_id)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{TITLE}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _plots(nights: Sequence[dict]) -> list[str]:
    figures = [
        (
            "images-scored",
            "Images scored per night",
            plot_counts(nights, "cells_scored", "Images scored per night", "#4f81bd"),
        ),
        ("flagged", "Flagged cells and subjects per night", plot_flagged(nights)),
        (
            "quarantined",
            "Images quarantined per night (first seen that night)",
            plot_counts(nights, "quarantined_new", "Images quarantined per night", "#f0b429"),
        ),
        ("throughput", "Images per second", plot_throughput(nights)),
        ("drift", "Drift signal and warnings", plot_drift(nights)),
    ]
    return [
        f"<figure><img id='plot-{key}' alt='{_h(caption)}' src='{figure_to_data_uri(fig)}'>"
        f"<figcaption>{_h(caption)}</figcaption></figure>"
        for key, caption, fig in figures
    ]


def _subject_section(run: dict) -> list[str]:
    details = run["details"]
    night, rule = details.get("night", {}), details.get("subject_rule", {})
    rows = []
    for s in details.get("subjects", []):
        flagged = {True: "YES", False: "no", None: "n/a"}[s["subject_flagged"]]
        cells = [
            _h(s["subject_id"] or "(no subject id)"),
            flagged,
            s["cells_scored"],
            s["cells_flagged"],
            f"{100 * s['flagged_fraction']:.1f}",
            f"{s['mean_score']:.4f}",
        ]
        css = " class='flagged'" if s["subject_flagged"] else ""
        rows.append(f"<tr{css}>" + "".join(_cell(c) for c in cells) + "</tr>")
    header = ("subject", "flagged", "cells scored", "cells flagged", "flagged %", "mean score")
    return [
        f"<h2>Latest night: {_h(details.get('date'))}</h2>",
        f"<p><b>{night.get('subjects_flagged', 0)} of {night.get('subjects', 0)} subjects "
        f"flagged</b> ({_h(rule.get('text', ''))}); {night.get('cells_flagged', 0)} of "
        f"{night.get('cells_scored', 0)} cells flagged ({_h(details.get('score_kind'))} &ge; "
        f"{_h(short(details.get('threshold')))}); model <code>{_h(run['model_id'])}</code>.</p>",
        "<table id='subjects'><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
        *rows,
        "</table>",
    ]


def _runs_section(sweeps: Sequence[dict], live_run_id: str | None) -> list[str]:
    header = (
        "started (UTC)",
        "night",
        "state",
        "found",
        "new",
        "scored",
        "quarantined",
        "images/s",
        "drift",
    )
    rows = []
    for run in list(reversed(sweeps))[:RECENT_RUNS]:
        drift = run["details"].get("drift") or {}
        drift_state = "WARNING" if drift.get("warning") else ("ok" if drift.get("cells") else "")
        rate = run["images_per_second"]
        cells = [
            run["started_at"].strftime("%Y-%m-%d %H:%M:%S"),
            _h(run["details"].get("date")),
            run_state(run, live_run_id),
            run["images_found"],
            run["images_new"],
            run["images_scored"],
            run["images_quarantined"],
            "" if rate is None else rate,
            drift_state,
        ]
        rows.append("<tr>" + "".join(_cell(c) for c in cells) + "</tr>")
    return [
        f"<h2>Recent sweeps (last {RECENT_RUNS})</h2>",
        "<table id='runs'><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
        *rows,
        "</table>",
    ]


def _cell(value: object) -> str:
    if isinstance(value, int | float):
        return f"<td class='num'>{value}</td>"
    return f"<td>{value}</td>"


def _h(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def write_dashboard(store: Location, out: Location, limit: int = 60) -> dict:
    """Read the store's sweeps, write the page to `out`; returns what it shows."""
    sweeps = load_sweeps(store)
    lease = read_lease(lease_location(store, SWEEP_LEASE))
    nights = nightly_series(sweeps, limit)
    page = render_dashboard(
        nights, sweeps, lease.run_id if lease else None, store.uri, datetime.now(UTC)
    )
    write_text_atomic(out, page)
    return {"path": out.uri, "nights": len(nights), "runs": len(sweeps)}
