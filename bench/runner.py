"""Running each section as a child process and turning what it left into measurements.

Steady state, everywhere: throughput once the engines are up, the models loaded and their graphs
traced, i.e. what a long run converges to. Compute limit: timed calls after a warm-up call. Plain
script: decoding plus each model's predict after its first batch (Keras traces on the first).
leukoflow: every image, from "actors loaded" (they trace at load) to the last Parquet file.
Total wall: the command from launch to exit, start-up included. leukoflow also gets "to last
vectors": launch to the last Parquet file, i.e. extraction with its start-up but without the
training and report that follow. All are reported; the goals' ratios use steady state.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.dataset import image_files, write_cells
from bench.procmon import Measured, log_tail, run_measured
from leukoflow.errors import LeukoflowError

MB = 1024 * 1024


class BenchError(LeukoflowError):
    """A section's command failed; the message carries the end of its log."""


def _check(measured: Measured, what: str) -> None:
    if measured.returncode != 0:
        raise BenchError(
            f"{what} exited with {measured.returncode}; end of {measured.log_path}:\n"
            f"{log_tail(measured.log_path)}"
        )


def _costs(measured: Measured) -> dict:
    return {
        "wall_seconds": round(measured.wall_seconds, 3),
        "peak_rss_mb": round(measured.peak_rss_bytes / MB, 1),
    }


def child_env() -> dict[str, str]:
    """The environment of every child: quiet, no telemetry, the project importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.pop("RAY_ADDRESS", None)  # always a private local Ray: never someone's cluster
    return env


# -- sections that are plain functions in a child (bench.sections) ----------------------------
def run_child_section(name: str, settings: dict, workdir: Path, label: str | None = None) -> dict:
    """Run bench.sections.<name> in a fresh interpreter; its result plus wall and peak memory.
    `label` names its files when one section runs twice (e.g. the compute limit in bf16)."""
    label = label or name
    settings_path = workdir / f"{label}.settings.json"
    result_path = workdir / f"{label}.result.json"
    settings_path.write_text(json.dumps(settings))
    command = [sys.executable, "-m", "bench.child", name, str(settings_path), str(result_path)]
    measured = run_measured(command, workdir / "logs" / f"{label}.log", env=child_env())
    _check(measured, f"section {name}")
    return {**json.loads(result_path.read_text()), **_costs(measured)}


# -- 2. the plain script -----------------------------------------------------------------------
def run_plain_script(settings: dict, images: Path, workdir: Path) -> dict:
    """The paper-style script (bench.plain_script) on the N images."""
    out = workdir / "plain-script"
    weights = settings["weights"]
    if weights == "imagenet":
        from leukoflow.features.backbones import keras_models_folder

        weights = str(keras_models_folder())
    command = [
        sys.executable, "-m", "bench.plain_script", str(images), str(out),
        "--backbones", ",".join(settings["backbones"]),
        "--image-size", str(settings["image_size"]),
        "--batch-size", str(settings["batch_size"]),
        "--weights", weights, "--precision", settings.get("precision", "fp32"),
    ]  # fmt: skip
    log = workdir / "logs" / f"plain_script-{settings.get('precision', 'fp32')}.log"
    measured = run_measured(command, log, env=child_env())
    _check(measured, "the plain script")
    timings = json.loads((out / "timings.json").read_text())
    shutil.rmtree(out)
    return {**plain_script_rates(timings), **_costs(measured), "timings": timings}


def plain_script_rates(timings: dict) -> dict:
    """Steady state of the plain script: decoding plus each model's predict after batch one."""
    n, batch = timings["n_images"], timings["batch_size"]
    seconds_per_image = timings["decode_seconds"] / n
    steady = n > batch
    for backbone in timings["backbones"].values():
        ends = backbone["batch_ends"]
        if steady and len(ends) >= 2:
            seconds_per_image += (ends[-1] - ends[0]) / (n - batch)
        else:
            steady = False
            seconds_per_image += backbone["predict_seconds"] / n
    return {
        "n_images": n,
        "images_per_second": 1.0 / seconds_per_image,
        "steady_state": steady,
        "images_per_second_total": n / timings["script_seconds"],
    }


# -- 3. leukoflow end to end -------------------------------------------------------------------
@dataclass
class PartWatcher:
    """Notes when each Parquet file first appears under STORE/features/backbone=<name>/."""

    features: Path
    backbones: list[str]
    seen: dict[str, dict[str, float]] = field(default_factory=dict)  # backbone -> name -> time
    first_compacted: float | None = None

    def tick(self) -> None:
        now = time.time()  # wall clock: compared with the time of day in Prefect's log
        for name in self.backbones:
            folder = self.features / f"backbone={name}"
            try:
                entries = os.listdir(folder)
            except FileNotFoundError:
                continue
            seen = self.seen.setdefault(name, {})
            for entry in entries:
                if entry.startswith("part-") and entry not in seen:
                    seen[entry] = now
                elif entry.startswith("compact-") and self.first_compacted is None:
                    self.first_compacted = now

    def times(self, expected: int) -> dict[str, list[float]]:
        """Per backbone, when each of its batch files appeared (its k-th file is batch k).

        A last batch merged away by the compaction before it was seen counts as written when
        the first merged file appeared.
        """
        times = {}
        for name in self.backbones:
            seen = sorted(self.seen.get(name, {}).values())
            if len(seen) < expected and self.first_compacted is not None:
                seen.append(self.first_compacted)
            times[name] = seen
        return times


def leukoflow_command() -> list[str]:
    """`leukoflow`, the console script installed next to this interpreter."""
    script = Path(sys.executable).parent / "leukoflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "leukoflow.cli"]


def run_leukoflow(settings: dict, images: Path, store: Path, workdir: Path, label: str) -> dict:
    """`leukoflow run IMAGES --store STORE --json` as a user runs it, its Parquet output watched."""
    n = len(image_files(images))
    command = [
        *leukoflow_command(), "run", str(images), "--store", str(store),
        "--dataset", "bench", "--backbones", ",".join(settings["backbones"]),
        "--weights", settings["weights"], "--image-size", str(settings["image_size"]),
        "--batch-size", str(settings["batch_size"]),
        "--precision", settings.get("precision", "fp32"), "--json",
    ]  # fmt: skip
    watcher = PartWatcher(store / "features", settings["backbones"])
    log = workdir / "logs" / f"{label}.log"
    measured = run_measured(command, log, env=child_env(), on_tick=watcher.tick)
    _check(measured, f"leukoflow run ({label})")
    summary = json.loads(measured.stdout_path.read_text().strip().splitlines()[-1])
    batch = settings["batch_size"]
    times = watcher.times(expected=-(-n // batch))
    # When every actor had its network loaded, as the run recorded it (epoch seconds).
    ready = summary["extraction"].get("actors_ready_at")
    return {
        "n_images": n,
        **leukoflow_rates(times, n, batch, ready),
        **_costs(measured),
        "images_per_second_total": n / measured.wall_seconds,
        # Extraction as the issue defines it (catalog, decode, all backbones, Parquet written),
        # start-up included; the training, calibration and report that follow are left out.
        "images_per_second_to_last_vectors": _to_last_vectors_rate(times, n, measured),
        "actors_ready_after_seconds": None
        if ready is None
        else round(ready - measured.started_wall, 3),
        "first_vectors_after_seconds": _after(times, measured, first=True),
        "after_last_vectors_seconds": _after(times, measured, first=False),
        "extraction_seconds": summary["extraction"]["seconds"],
        "counts": summary["counts"],
    }


def leukoflow_rates(times: dict[str, list[float]], n: int, batch: int, ready: float | None) -> dict:
    """Steady state: every image, from the moment all actors are loaded (their graphs traced)
    to the moment the last batch's Parquet files land.

    The driver writes a batch's files only when every backbone has finished it, so file times
    alone would flatter: when the slowest backbone finishes batch 1, faster ones are already
    up to two batches further. Without a recorded `actors_ready_at` the rate over batches
    2..last is kept, flagged as an upper bound.
    """
    expected = -(-n // batch)
    if any(len(t) < expected for t in times.values()):
        seen = min((len(t) for t in times.values()), default=0)
        return {"images_per_second": None, "steady_state": False, "batches_seen": seen}
    last = max(t[-1] for t in times.values())
    first = max(t[0] for t in times.values())
    # Tiny runs can land every batch within one 0.5 s watch tick: no rate after the first then.
    after_first = (n - batch) / (last - first) if expected >= 2 and last > first else None
    return {
        "images_per_second": after_first if ready is None else n / (last - ready),
        "steady_state": True,
        "basis": "batches 2..last (upper bound)" if ready is None else "actors loaded -> last",
        "images_per_second_after_first_batch": after_first,
        "batches_seen": expected,
    }


def _to_last_vectors_rate(times: dict[str, list], n: int, measured: Measured) -> float | None:
    tail = _after(times, measured, first=False)
    return None if tail is None else n / (measured.wall_seconds - tail)


def _after(times: dict[str, list[float]], measured: Measured, first: bool) -> float | None:
    """Seconds from launch to the first vectors, or from the last vectors to the exit."""
    ends = [t[0] if first else t[-1] for t in times.values() if t]
    if not ends:
        return None
    if first:
        return round(min(ends) - measured.started_wall, 3)
    return round(measured.started_wall + measured.wall_seconds - max(ends), 3)


# -- nightly sweep -----------------------------------------------------------------------------
def run_sweep(store: Path, inbox: Path, workdir: Path, label: str) -> dict:
    """`leukoflow score INBOX --store STORE --json`: wall time, memory and its counts."""
    command = [*leukoflow_command(), "score", str(inbox), "--store", str(store), "--json"]
    measured = run_measured(command, workdir / "logs" / f"{label}.log", env=child_env())
    _check(measured, f"leukoflow score ({label})")
    summary = json.loads(measured.stdout_path.read_text().strip().splitlines()[-1])
    return {
        **_costs(measured),
        "sweep_seconds": summary.get("seconds"),  # inside the flow, after start-up
        "counts": summary.get("counts"),
        "outcome": summary.get("outcome"),
    }


def nightly_for_store(
    store: Path, images: Path, cells: list, new: int, workdir: Path, label: str
) -> dict:
    """Three sweeps over an inbox of the store's own images: first (scores everything), nothing
    new (the nightly common case), then `new` unseen images added."""
    inbox = workdir / f"inbox-{label}"
    shutil.rmtree(inbox, ignore_errors=True)
    for path in image_files(images):
        target = inbox / path.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    first = run_sweep(store, inbox, workdir, f"score-{label}-first")
    nothing = run_sweep(store, inbox, workdir, f"score-{label}-nothing-new")
    write_cells(inbox, cells, first=10_000_000, count=new)
    with_new = run_sweep(store, inbox, workdir, f"score-{label}-{new}-new")
    return {
        "store_images": len(image_files(images)),
        "first_sweep": first,
        "nothing_new": nothing,
        "with_new": with_new,
        "new_images": new,
        "seconds_per_new_image": (with_new["wall_seconds"] - nothing["wall_seconds"]) / new,
    }
