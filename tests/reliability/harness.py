"""Running the real `leukoflow` command and the processes it starts, and ending them cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Recognisable fake credentials: no output, file or table may ever contain one of them.
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKELEAKCHECK0001",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretLeakCheck/0002+xyz",
    "PREFECT_API_KEY": "pnu_fakeLeakCheck0003",
    "RAY_AUTH_TOKEN": "fakeraytokenleakcheck0004",
}

# Run as root, but without the capabilities that let root read any file: chmod 000 then means
# what it means for every other user, so "permission denied" is real, not simulated.
WITHOUT_DAC_OVERRIDE = [
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
    "--inh-caps",
    "-dac_override,-dac_read_search",
    "--",
]

SMALL_RUN = ["--weights", "none", "--backbones", "vgg16", "--image-size", "32"]


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "leukoflow.cli", *map(str, args)]


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI run with its own Prefect database (its logs and artifacts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(
        PREFECT_HOME=str(home / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        RAY_USAGE_STATS_ENABLED="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        # A fresh Prefect database is migrated on first start: slow on a busy 2-core machine.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
    )
    env.pop("LEUKOFLOW_DEBUG", None)
    env.update(extra)
    return env


def leukoflow(
    *args: object, env: dict[str, str], prefix: Iterable[str] = (), timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `leukoflow ARGS` to the end in its own process group, killed whole on timeout."""
    process = subprocess.Popen(
        [*prefix, *cli_command(*args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        end_process_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


class Background:
    """`leukoflow ARGS` started in its own session, output to files, for tests that interrupt it."""

    def __init__(self, *args: object, env: dict[str, str], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._out, self._err = workdir / "stdout.txt", workdir / "stderr.txt"
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.process = subprocess.Popen(
                cli_command(*args), stdout=out, stderr=err, env=env, start_new_session=True
            )

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str):
        """wait_for, failing at once with the run's output if the run ends first."""

        def condition_or_exit():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the run exited ({self.process.returncode}) before {what}:\n"
                    f"{self._err.read_text()[-3000:]}"
                )
            return condition()

        return wait_for(condition_or_exit, timeout, what)

    def members(self) -> list[int]:
        """Every live process of the run: the CLI, Prefect's server, Ray and its workers."""
        return session_members(self.process.pid)

    def actor_pids(self, name: str = "ray::BackboneActor") -> list[int]:
        return [pid for pid in self.members() if command_line(pid).startswith(name)]

    def finish(self, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout=timeout)
        finally:
            end_process_group(self.process)
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, self._out.read_text(), self._err.read_text()
        )

    def stop(self) -> None:
        """End the run and everything it started, if still there (for finally: blocks)."""
        end_process_group(self.process)

    def kill_everything(self) -> None:
        """kill -9 of the whole run, every process at once, as a crash or an OOM killer would."""
        for pid in self.members():
            _signal(pid, signal.SIGKILL)
        wait_for(lambda: not any(_alive(pid) for pid in self.members()), 30, "the run to die")
        self.process.wait(timeout=10)


def last_json(stdout: str) -> dict:
    """The --json contract: the last line of stdout is one JSON object."""
    return json.loads(stdout.strip().splitlines()[-1])


def assert_one_line_error(
    result: subprocess.CompletedProcess, *words: str, code: int = 2, prefix: str = "error"
) -> str:
    """Exit `code` (2: usage or configuration), no traceback, exactly one `leukoflow: PREFIX:`
    line holding every word."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    head = f"leukoflow: {prefix}:"
    lines = [line for line in result.stderr.splitlines() if line.startswith(head)]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -- processes -------------------------------------------------------------------------------
def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc (Ray's workers are grandchildren)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid`: Ray gives its workers their own process groups, but they
    stay in the session of the command that started Ray."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
            members.append(int(entry))
    return members


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    """Poll until `condition()` is truthy; return its value, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def end_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process's group and any descendant that left it, then SIGKILL what remains."""
    pids = {process.pid, *children_of(process.pid), *session_members(process.pid)}
    groups = {process.pid}  # start_new_session: the group id is the leader's pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            _signal_group(group, sig)
        for pid in pids:
            _signal(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            if process.poll() is None:
                try:
                    process.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.1)
        if not any(_alive(pid) for pid in pids):
            break
    if process.poll() is None:
        process.wait(timeout=5)


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead; only its parent's wait() removes it


# -- striking on a condition (the fault tests) -----------------------------------------------
def freeze(*pids: int) -> None:
    """SIGSTOP: the processes stop where they are (a batch stays in flight) until killed or
    thawed, so a test can strike at a known point instead of racing the run."""
    for pid in pids:
        _signal(pid, signal.SIGSTOP)


def thaw(*pids: int) -> None:
    for pid in pids:
        _signal(pid, signal.SIGCONT)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return _alive(pid)


# -- what a run left in a features folder ----------------------------------------------------
def parts(folder: Path) -> list[Path]:
    """The feature files a reader sees (hidden temporary files excluded)."""
    return sorted(folder.glob("part-*.parquet")) if folder.exists() else []


def feature_ids(folder: Path) -> list[str]:
    """Image ids of every visible feature row; reading them proves every file is whole."""
    import pyarrow.dataset as ds

    if not folder.exists():
        return []
    table = ds.dataset(str(folder), format="parquet").to_table(columns=["image_id"])
    return table.column("image_id").to_pylist()
