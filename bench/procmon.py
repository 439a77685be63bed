"""Running one benchmark command as a child process: wall time and peak memory of its whole tree.

Peak memory is the largest sum, over the child and all its descendants (Ray's raylet, workers and
actors, Prefect's temporary server), of resident set sizes, sampled every `rss_every` seconds.
Pages shared between processes (Ray's object store, shared libraries) count once per process,
so the number is an upper bound; it is measured the same way for every section, which is what
the comparisons need.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Measured:
    """What one child process run cost."""

    returncode: int
    wall_seconds: float
    peak_rss_bytes: int
    started_wall: float  # time.time() at launch, to relate watcher and log times to it
    log_path: Path  # stderr (and Prefect's logs); stdout is log_path with suffix ".out"

    @property
    def stdout_path(self) -> Path:
        return self.log_path.with_suffix(".out")


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (processes gone meanwhile skipped)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def run_measured(
    command: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 3600.0,
    rss_every: float = 0.5,
    on_tick: Callable[[], None] | None = None,
    tick_every: float = 0.02,
) -> Measured:
    """Run `command` to completion; stderr goes to `log_path`, stdout next to it (".out").

    `on_tick` is called every `tick_every` seconds while the child runs (the Parquet watcher).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log, open(log_path.with_suffix(".out"), "wb") as out:
        started, started_wall = time.perf_counter(), time.time()
        # A session of its own: on timeout the whole group it started can be stopped at once.
        child = subprocess.Popen(command, stdout=out, stderr=log, env=env, start_new_session=True)
        watched = psutil.Process(child.pid)
        peak, next_rss = 0, started
        while child.poll() is None:
            now = time.perf_counter()
            if now - started > timeout:
                _stop_group(child)
                raise TimeoutError(f"{' '.join(command[:4])}... ran past {timeout:.0f}s")
            if now >= next_rss:
                peak = max(peak, tree_rss(watched))
                next_rss = now + rss_every
            if on_tick is not None:
                on_tick()
            time.sleep(tick_every)
        wall = time.perf_counter() - started
    if on_tick is not None:
        on_tick()
    return Measured(child.returncode, wall, peak, started_wall, log_path)


def _stop_group(child: subprocess.Popen) -> None:
    """Stop the child's process group (only processes this harness started)."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a child's log, for error messages."""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])
