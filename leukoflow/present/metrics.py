"""The store's nights as Prometheus metrics, for ops dashboards (Grafana, infra/grafana/).

The same nights the offline dashboard plots (present/dashboard.nightly_series, from the sweeps'
run rows), written in the Prometheus text exposition format by `prometheus_client`: printed by
`leukoflow metrics --store STORE`, or written atomically for node_exporter's textfile collector
(`--textfile PATH`, prometheus_client.write_to_textfile: a temporary file renamed into place).

Per-night series carry a `night` label (YYYY-MM-DD) and are gauges: a night's numbers are
re-read from the store each time, never counted up in this process. No subject id, raw or
keyed, is ever a label: subjects are counted only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from leukoflow.present.dashboard import load_sweeps, nightly_series
from leukoflow.store import registry
from leukoflow.store.storage import Location
from leukoflow.vocabulary import Outcome

PREFIX = "leukoflow"
NIGHTS_SHOWN = 60  # the recent nights exported per-night series (as the dashboard's plots)


@dataclass(frozen=True)
class StoreNights:
    """What the metrics say, read once from the store."""

    nights: list[dict]  # present/dashboard.nightly_series, oldest first
    outcomes: dict[str, int]  # sweeps by outcome, every night
    last_completed_at: datetime | None
    model_id: str | None


def read_store_nights(store: Location, limit: int = NIGHTS_SHOWN) -> StoreNights:
    """The store's sweeps, their nights and the current model."""
    sweeps = load_sweeps(store)
    done = [s for s in sweeps if s.outcome == Outcome.COMPLETED]
    last = max((s.finished_at for s in done if s.finished_at), default=None)
    return StoreNights(
        nights=nightly_series(sweeps, limit),
        outcomes=dict(Counter(str(s.outcome) for s in sweeps)),
        last_completed_at=last,
        model_id=registry.current_model_id(store),
    )


class NightsCollector(Collector):
    """A prometheus_client collector over one reading of the store."""

    def __init__(self, data: StoreNights, now: datetime):
        self.data, self.now = data, now

    def collect(self) -> Iterator:
        data = self.data
        runs = GaugeMetricFamily(
            f"{PREFIX}_sweeps", "Nightly sweeps in the store, by outcome", labels=["outcome"]
        )
        for outcome in Outcome:
            runs.add_metric([outcome.value], data.outcomes.get(outcome.value, 0))
        yield runs

        hours = GaugeMetricFamily(
            f"{PREFIX}_hours_since_last_completed_night",
            "Hours since the last sweep that completed (absent: none has)",
        )
        if data.last_completed_at is not None:
            age = self.now - data.last_completed_at.astimezone(UTC)
            hours.add_metric([], round(age.total_seconds() / 3600, 3))
        yield hours

        model = InfoMetricFamily(f"{PREFIX}_model", "The store's current model")
        if data.model_id is not None:
            model.add_metric([], {"model_id": data.model_id})
        yield model

        yield from _per_night(data.nights)


# (series name, help, key in a nightly_series point): one gauge per night each.
PER_NIGHT = (
    ("night_completed", "1 when a sweep of the night completed, else 0", "completed"),
    ("night_images_scored", "Cells scored for the night", "cells_scored"),
    ("night_images_flagged", "Cells flagged ALL-like for the night", "cells_flagged"),
    ("night_images_quarantined", "Images set aside by the night's sweeps", "quarantined_new"),
    ("night_subjects", "Subjects seen in the night", "subjects"),
    ("night_subjects_flagged", "Subjects flagged for review in the night", "subjects_flagged"),
    ("night_images_per_second", "Scoring throughput of the night's sweeps", "images_per_second"),
    ("night_feature_drift", "Feature drift (mean |z| of feature means)", "feature_shift"),
    ("night_score_drift", "Score drift (KS distance to the reference)", "score_ks"),
    ("night_drift_warning", "1 when the night's drift was a warning", "drift_warning"),
)


def _per_night(nights: Sequence[dict]) -> Iterator[GaugeMetricFamily]:
    for name, help_text, key in PER_NIGHT:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=["night"])
        for night in nights:
            value = night.get(key)
            if value is not None:  # a night without the measure has no sample
                family.add_metric([night["date"]], float(value))
        yield family


def exposition(data: StoreNights, now: datetime) -> str:
    """The Prometheus text format of `data` as of `now`."""
    return generate_latest(_registry(data, now)).decode("utf-8")


def write_textfile(data: StoreNights, now: datetime, path: str) -> None:
    """Atomically (temporary file + rename) for node_exporter's textfile collector."""
    write_to_textfile(path, _registry(data, now))


def _registry(data: StoreNights, now: datetime) -> CollectorRegistry:
    # A private registry: nothing of this process (Python GC, platform) leaks into the output.
    private = CollectorRegistry(auto_describe=True)
    private.register(NightsCollector(data, now))
    return private


def series_names() -> list[str]:
    """Every series name the output can hold (the Grafana dashboard may query only these)."""
    names = [f"{PREFIX}_sweeps", f"{PREFIX}_hours_since_last_completed_night"]
    names.append(f"{PREFIX}_model_info")
    return names + [f"{PREFIX}_{name}" for name, _, _ in PER_NIGHT]
