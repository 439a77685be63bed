"""Process helpers for tests that start real servers (Ray nodes, Prefect server, moto, workers).

Every server runs in its own session (process group): stopping it ends the whole group, SIGTERM
first, then SIGKILL, and then any process still naming the test's private folder (Ray's daemons
outlive `ray start --block` when it is killed). Nothing is ever ended by a broad name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts: quiet, no telemetry, no stray cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update(extra)
    return env


class Server:
    """A long-running command in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, workdir: Path, marker: str):
        self.name = name
        self.log = workdir / f"{name}.log"
        self.marker = marker  # a path only this test's processes name on their command line
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                env=env,
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, grace_s: float = 10.0) -> None:
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        kill_processes_naming(self.marker)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def processes_naming(marker: str) -> list[int]:
    """Ids of this user's processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


def kill_processes_naming(marker: str, wait_s: float = 10.0) -> None:
    """SIGKILL each process still naming `marker` (a private temp folder), by its id."""
    for pid in processes_naming(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while processes_naming(marker) and time.monotonic() < deadline:
        time.sleep(0.2)


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, server=None):
    """Poll `condition` until it returns something truthy; fail with the server's log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if server is not None and not server.alive():
            raise AssertionError(
                f"{server.name} exited while waiting for {what}:\n{server.output()}"
            )
        time.sleep(0.5)
    tail = server.output()[-3000:] if server is not None else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tail}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def http_json(url: str, headers: dict | None = None, timeout_s: float = 10.0):
    """GET a JSON document; None when the server is not answering yet."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def http_status(url: str, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def run_cli(args: list[str], env: dict, cwd: Path, timeout_s: float = 300):
    """Run `leukoflow ARGS` as a user would, in its own process group."""
    process = subprocess.Popen(
        [str(BIN / "leukoflow"), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"leukoflow {args[0]} timed out:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])
