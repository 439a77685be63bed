"""The ops dashboard: one self-contained HTML page of the nightly sweeps.

Like the evaluation report it must open offline (a laptop, an S3 console download): inline CSS,
plots as base64 PNG data URIs, no scripts, links or web fonts. It reads only the runs table, where
every sweep's row carries its night's totals, drift and subject table in `details`, and the sweep
lease (to tell an interrupted sweep from a running one). `nightly_series`, `night_series`,
`dashboard_view` and `render_dashboard` are pure; `write_dashboard` does the reading and writing.

Ops must see a night that went wrong: the plots use a real date axis, so a night without any
sweep is a gap, and a night whose sweeps were all busy, timed out or failed is marked as such
rather than drawn as an empty good night. A banner says when the last completed sweep is older
than `stale_after_hours`. Subject ids can be patient identifiers: the page shows keyed
pseudonyms (store/pseudonym), never the ids the runs table holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache

import matplotlib.dates as mdates
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from leukoflow import choices
from leukoflow.present import pages
from leukoflow.present.pages import Plot
from leukoflow.present.report import figure_to_data_uri
from leukoflow.scoring.score import SweepDetails, short
from leukoflow.store.lease import SWEEP_LEASE, lease_location, read_lease
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.storage import Location, write_text_atomic
from leukoflow.store.tables import RunRow, read_run_rows
from leukoflow.vocabulary import Outcome, RunKind

TITLE = "leukoflow nightly sweeps"
RECENT_RUNS = 20
NO_SUBJECT = "(no subject id)"
# store/pseudonym's key. Sweeps now write their subject rows keyed already; rows written before
# that hold the raw id, which the page keys itself (keying a key again would change it).
SUBJECT_KEY = re.compile(r"S-[0-9a-f]{12}")
# Per-night values the plots draw; a night without a completed sweep has none of them (NaN).
SERIES_KEYS = (
    "cells_scored",
    "cells_flagged",
    "subjects",
    "subjects_flagged",
    "quarantined_new",
    "images_per_second",
    "feature_shift",
    "score_ks",
)


# -- reading ---------------------------------------------------------------------------------
def load_sweeps(store: Location) -> list[RunRow]:
    """Every sweep's run row, oldest first."""
    return [row for row in read_run_rows(store) if row.kind == RunKind.SCORE]


def run_state(run: RunRow, live_run_id: str | None) -> str:
    """completed | failed | busy | timed_out (as the row says) | running (holds the lease now) |
    interrupted (its row says running, but it no longer holds the lease: killed mid-sweep)."""
    if run.outcome != Outcome.RUNNING:
        return run.outcome
    return "running" if run.run_id == live_run_id else "interrupted"


def night_of(run: RunRow) -> str:
    """The night a sweep scored for: its `date`, else the UTC day it started (a busy sweep's row
    may carry no date)."""
    return SweepDetails.of(run).date or run.started_at.astimezone(UTC).date().isoformat()


# -- nights ----------------------------------------------------------------------------------
def nightly_series(sweeps: Sequence[RunRow], limit: int) -> list[dict]:
    """One point per night with sweeps: its totals (from its last completed sweep) and its runs'
    signals; `completed` says whether any sweep of that night completed."""
    by_night: dict[str, list[RunRow]] = {}
    for run in sweeps:
        by_night.setdefault(night_of(run), []).append(run)
    nights = []
    for night in sorted(by_night)[-limit:] if limit > 0 else []:
        runs = by_night[night]
        done = [r for r in runs if r.outcome == Outcome.COMPLETED]
        totals = SweepDetails.of(done[-1]).night if done else {}
        scoring = [r for r in done if r.images_scored]
        details = [SweepDetails.of(r) for r in scoring]
        seconds = sum(d.seconds or 0 for d in details)
        drifts = [d.drift for d in details if d.drift]
        nights.append(
            {
                "date": night,
                "runs": len(runs),
                "completed": bool(done),
                "outcomes": sorted({r.outcome for r in runs}),
                "cells_scored": totals.get("cells_scored", 0),
                "cells_flagged": totals.get("cells_flagged", 0),
                "subjects": totals.get("subjects", 0),
                "subjects_flagged": totals.get("subjects_flagged", 0),
                "quarantined_new": sum(
                    SweepDetails.of(r).counts.get("quarantined_new", 0) for r in done
                ),
                "images_per_second": (
                    round(sum(r.images_scored for r in scoring) / seconds, 3) if seconds else None
                ),
                "feature_shift": _max(d.get("feature_shift") for d in drifts),
                "score_ks": _max(d.get("score_ks") for d in drifts),
                "drift_warning": any(d.get("warning") for d in drifts),
                "thresholds": drifts[-1].get("thresholds") if drifts else None,
            }
        )
    return nights


def _first(*values):
    return next((v for v in values if v is not None), None)


def _max(values) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


@dataclass(frozen=True)
class NightSeries:
    """Every calendar day from the first night to the last, for plotting on a date axis.

    `state` is "completed", "missing" (no sweep at all that night) or "unhealthy" (sweeps ran,
    none completed: busy, timed out, failed, interrupted or still running). `values[key]` is NaN
    on every day that is not "completed", so lines break and bars are absent there.
    """

    days: tuple[date, ...]
    state: tuple[str, ...]
    values: dict[str, np.ndarray]
    drift_warning: tuple[bool, ...]
    thresholds: dict | None

    def on(self, state: str) -> list[date]:
        return [d for d, s in zip(self.days, self.state, strict=True) if s == state]


def night_series(nights: Sequence[dict]) -> NightSeries:
    """The nights laid out day by day, gaps included (see NightSeries)."""
    if not nights:
        return NightSeries((), (), {k: np.array([]) for k in SERIES_KEYS}, (), None)
    by_day = {date.fromisoformat(n["date"]): n for n in nights}
    first, last = min(by_day), max(by_day)
    days = tuple(first + timedelta(days=i) for i in range((last - first).days + 1))
    state, warnings = [], []
    values = {key: np.full(len(days), np.nan) for key in SERIES_KEYS}
    for i, day in enumerate(days):
        night = by_day.get(day)
        if night is None:
            state.append("missing")
        elif not night.get("completed", True):
            state.append("unhealthy")
        else:
            state.append("completed")
            for key in SERIES_KEYS:
                if night.get(key) is not None:
                    values[key][i] = night[key]
        warnings.append(bool(night and night.get("drift_warning")))
    thresholds = next((n["thresholds"] for n in reversed(nights) if n.get("thresholds")), None)
    return NightSeries(days, tuple(state), values, tuple(warnings), thresholds)


# -- plots -----------------------------------------------------------------------------------
def _around(day: date, hours: float) -> datetime:
    """A moment `hours` from the night's slot (a date alone cannot be offset by hours)."""
    return datetime.combine(day, time()) + timedelta(hours=hours)


def _date_axis(ax: Axes, series: NightSeries, title: str | None = None) -> None:
    """A real date axis over the whole span; nights without a completed sweep shaded."""
    if title:
        ax.set_title(title, fontsize=10)
    locator = mdates.AutoDateLocator(minticks=3, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.tick_params(axis="x", labelsize=7)
    if series.days:
        ax.set_xlim(_around(series.days[0], -14), _around(series.days[-1], 14))
    ax.grid(axis="y", alpha=0.3)
    for i, day in enumerate(series.on("unhealthy")):
        ax.axvspan(
            _around(day, -12),
            _around(day, 12),
            facecolor="none",
            edgecolor="#b45309",
            hatch="///",
            linewidth=0,
            label="no completed sweep" if i == 0 else None,
        )


def _figure(title: str, series: NightSeries) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(5.6, 2.9))
    ax = fig.add_subplot()
    _date_axis(ax, series, title)
    return fig, ax


def _bars(ax: Axes, series: NightSeries, key: str, color: str, label: str | None = None) -> None:
    values = series.values[key]
    shown = [(d, v) for d, v in zip(series.days, values, strict=True) if not math.isnan(v)]
    if shown:
        days, heights = zip(*shown, strict=True)
        ax.bar(days, heights, width=0.8, color=color, label=label)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # whole images, cells, subjects


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_counts(series: NightSeries, key: str, title: str, color: str) -> Figure:
    """Bars of one per-night count; no bar on a night without a completed sweep."""
    fig, ax = _figure(title, series)
    _bars(ax, series, key, color)
    ax.set_ylim(bottom=0)
    _legend(ax)
    return fig


def plot_flagged(series: NightSeries) -> Figure:
    """Flagged cells (top) and subjects seen and flagged (bottom): two axes, since one subject
    holds many cells and a shared axis would flatten the subject bars."""
    fig = Figure(figsize=(5.6, 4.2))
    cells, subjects = fig.subplots(2, 1, sharex=True)
    _date_axis(cells, series, "Flagged cells per night")
    _bars(cells, series, "cells_flagged", "#c0504d", "flagged cells")
    _date_axis(subjects, series, "Subjects per night")
    _bars(subjects, series, "subjects", "#bfbfbf", "subjects seen")
    _bars(subjects, series, "subjects_flagged", "#7f1d1d", "subjects flagged")
    for ax in (cells, subjects):
        ax.set_ylim(bottom=0)
        _legend(ax)
    fig.tight_layout()
    return fig


def plot_throughput(series: NightSeries) -> Figure:
    """Images scored per second of sweep; the line breaks over nights without a value."""
    fig, ax = _figure("Throughput (images scored per second of sweep)", series)
    ax.plot(series.days, series.values["images_per_second"], marker="o", color="#4f81bd")
    ax.set_ylim(bottom=0)
    _legend(ax)
    return fig


def plot_drift(series: NightSeries) -> Figure:
    """Both drift measures with their thresholds dashed; warning nights shaded red."""
    fig, ax = _figure("Drift against the model's reference (red: warning)", series)
    for key, label, color in (
        ("feature_shift", "feature shift (mean |z|)", "#4f81bd"),
        ("score_ks", "score KS distance", "#9bbb59"),
    ):
        if not np.isnan(series.values[key]).all():
            ax.plot(series.days, series.values[key], marker="o", label=label, color=color)
    if series.thresholds:
        ax.axhline(series.thresholds["feature_shift"], color="#4f81bd", linestyle="--", lw=0.8)
        ax.axhline(series.thresholds["score_ks"], color="#9bbb59", linestyle="--", lw=0.8)
    for day, warned in zip(series.days, series.drift_warning, strict=True):
        if warned:
            ax.axvspan(_around(day, -10), _around(day, 10), color="#c81e1e", alpha=0.2)
    _legend(ax)
    return fig


def _plots(nights: Sequence[dict]) -> tuple[Plot, ...]:
    series = night_series(nights)
    figures = (
        (
            "images-scored",
            "Images scored per night",
            plot_counts(series, "cells_scored", "Images scored per night", "#4f81bd"),
        ),
        ("flagged", "Flagged cells and subjects per night", plot_flagged(series)),
        (
            "quarantined",
            "Images quarantined per night (first seen that night)",
            plot_counts(series, "quarantined_new", "Images quarantined per night", "#f0b429"),
        ),
        ("throughput", "Images per second", plot_throughput(series)),
        ("drift", "Drift signal and warnings", plot_drift(series)),
    )
    return tuple(
        Plot(figure_to_data_uri(fig), caption, f"plot-{key}") for key, caption, fig in figures
    )


# -- the view model --------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectRow:
    """One subject of the latest night, under its pseudonym."""

    subject: str
    flagged: str
    cells_scored: int
    cells_flagged: int
    flagged_percent: str
    mean_score: str
    is_flagged: bool


@dataclass(frozen=True)
class LatestNight:
    """The last completed sweep's night: the subject table a clinician reads first."""

    date: str
    subjects: int
    subjects_flagged: int
    cells_scored: int
    cells_flagged: int
    rule: str
    score_kind: str
    threshold: str
    model_id: str
    rows: tuple[SubjectRow, ...]


@dataclass(frozen=True)
class RecentRun:
    """One sweep in the recent-runs table; `healthy` is false for busy, timed-out, failed and
    interrupted sweeps."""

    started: str
    night: str
    state: str
    found: int | None
    new: int | None
    scored: int | None
    quarantined: int | None
    missing: int | None
    images_per_second: float | None
    drift: str
    healthy: bool


@dataclass(frozen=True)
class DashboardView:
    title: str
    store_uri: str
    generated_at: str
    non_clinical: bool
    stale: str | None
    plots: tuple[Plot, ...]
    latest: LatestNight | None
    runs: tuple[RecentRun, ...]
    recent_runs: int


def stale_notice(
    sweeps: Sequence[RunRow], now: datetime, stale_after_hours: float = choices.STALE_AFTER_HOURS
) -> str | None:
    """The banner text when the last completed sweep is older than `stale_after_hours`
    (or none ever completed); None when the sweeps are current or there are none at all."""
    if not sweeps:
        return None
    done = [r for r in sweeps if r.outcome == Outcome.COMPLETED]
    if not done:
        return (
            f"No sweep has completed: {len(sweeps)} sweep(s) ran, none completed. Check the "
            "nightly deployment (the runs below say busy, timed out, failed or interrupted)."
        )
    last = max(done, key=_finished)
    age_hours = (now - _finished(last)).total_seconds() / 3600
    if age_hours <= stale_after_hours:
        return None
    return (
        f"The last completed sweep finished {age_hours:.0f} h ago "
        f"({_finished(last).strftime('%Y-%m-%d %H:%M UTC')}, night {night_of(last)}), more than "
        f"{stale_after_hours:g} h: nights since then were not scored. Check the nightly "
        "deployment (the runs below say busy, timed out, failed or interrupted)."
    )


def _finished(run: RunRow) -> datetime:
    return run.finished_at or run.started_at


def _latest_night(run: RunRow, pseudonym: Callable[[str | None], str | None]) -> LatestNight:
    details = SweepDetails.of(run)
    night = details.night
    rows = tuple(
        SubjectRow(
            subject=_shown_subject(s.get("subject_id"), pseudonym),
            flagged={True: "YES", False: "no", None: "n/a"}[s["subject_flagged"]],
            cells_scored=s["cells_scored"],
            cells_flagged=s["cells_flagged"],
            flagged_percent=f"{100 * s['flagged_fraction']:.1f}",
            mean_score=f"{s['mean_score']:.4f}",
            is_flagged=bool(s["subject_flagged"]),
        )
        for s in details.subjects
    )
    return LatestNight(
        date=str(details.date),
        subjects=night.get("subjects", 0),
        subjects_flagged=night.get("subjects_flagged", 0),
        cells_scored=night.get("cells_scored", 0),
        cells_flagged=night.get("cells_flagged", 0),
        rule=details.rule_text,
        score_kind=str(details.score_kind),
        threshold=short(details.threshold),
        model_id=str(run.model_id),
        rows=rows,
    )


def _shown_subject(subject_id: str | None, pseudonym: Callable[[str | None], str | None]) -> str:
    if not subject_id:
        return NO_SUBJECT
    if SUBJECT_KEY.fullmatch(subject_id):
        return subject_id
    return pseudonym(subject_id) or NO_SUBJECT


def _recent_run(run: RunRow, live_run_id: str | None) -> RecentRun:
    details = SweepDetails.of(run)
    drift, counts = details.drift, details.counts
    state = run_state(run, live_run_id)
    return RecentRun(
        started=run.started_at.strftime("%Y-%m-%d %H:%M:%S"),
        night=night_of(run),
        state=state,
        found=run.images_found,
        new=run.images_new,
        scored=run.images_scored,
        quarantined=run.images_quarantined,
        # Null in rows written before the column existed; the details may still hold it.
        missing=_first(run.images_missing, counts.get("missing")),
        images_per_second=run.images_per_second,
        drift="WARNING" if drift.get("warning") else ("ok" if drift.get("cells") else ""),
        healthy=state in ("completed", "running"),
    )


def dashboard_view(
    nights: Sequence[dict],
    sweeps: Sequence[RunRow],
    live_run_id: str | None,
    store_uri: str,
    generated_at: datetime,
    *,
    pseudonym: Callable[[str | None], str | None],
    stale_after_hours: float = choices.STALE_AFTER_HOURS,
) -> DashboardView:
    """What the page shows; `pseudonym` maps a subject id to its key, `generated_at` is "now"."""
    latest = next((r for r in reversed(sweeps) if r.outcome == Outcome.COMPLETED), None)
    return DashboardView(
        title=TITLE,
        store_uri=store_uri,
        generated_at=generated_at.strftime("%Y-%m-%d %H:%M UTC"),
        non_clinical=bool(latest and SweepDetails.of(latest).non_clinical),
        stale=stale_notice(sweeps, generated_at, stale_after_hours),
        plots=_plots(nights) if nights else (),
        latest=_latest_night(latest, pseudonym) if latest else None,
        runs=tuple(_recent_run(r, live_run_id) for r in list(reversed(sweeps))[:RECENT_RUNS]),
        recent_runs=RECENT_RUNS,
    )


# -- the page --------------------------------------------------------------------------------
def render_dashboard(
    nights: Sequence[dict],
    sweeps: Sequence[RunRow],
    live_run_id: str | None,
    store_uri: str,
    generated_at: datetime,
    *,
    pseudonym: Callable[[str | None], str | None],
    stale_after_hours: float = choices.STALE_AFTER_HOURS,
) -> str:
    """The whole page as one HTML string (no network: data URIs only)."""
    view = dashboard_view(
        nights,
        sweeps,
        live_run_id,
        store_uri,
        generated_at,
        pseudonym=pseudonym,
        stale_after_hours=stale_after_hours,
    )
    return pages.render("dashboard.html", page=view)


def write_dashboard(
    store: Location,
    out: Location,
    limit: int = choices.DASHBOARD_NIGHTS,
    *,
    stale_after_hours: float = choices.STALE_AFTER_HOURS,
    now: datetime | None = None,
) -> dict:
    """Read the store's sweeps, write the page to `out`; returns what it shows."""
    sweeps = load_sweeps(store)
    lease = read_lease(lease_location(store, SWEEP_LEASE))
    nights = nightly_series(sweeps, limit)
    now = now or datetime.now(UTC)

    @cache
    def salt() -> bytes:
        # Read only when a subject is shown: a store without sweeps gets no salt written.
        return subject_salt(store)

    page = render_dashboard(
        nights,
        sweeps,
        lease.run_id if lease else None,
        store.uri,
        now,
        pseudonym=lambda subject_id: subject_key(subject_id, salt()) if subject_id else None,
        stale_after_hours=stale_after_hours,
    )
    write_text_atomic(out, page)
    return {
        "path": out.uri,
        "nights": len(nights),
        "runs": len(sweeps),
        "stale": stale_notice(sweeps, now, stale_after_hours) is not None,
    }
