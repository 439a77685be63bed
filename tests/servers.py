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
SHARED_PREFECT_SETTINGS = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_HOME")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts: quiet, no telemetry, no stray cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    # ... but the run's one Prefect server (tests/conftest.py): a CLI run reports to it instead
    # of starting an ephemeral server of its own.
    env.update({k: os.environ[k] for k in SHARED_PREFECT_SETTINGS if k in os.environ})
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


# -- the servers of a whole test run ----------------------------------------------------------
# One Prefect server and one moto S3 server serve every process of a `pytest -n 2` run: the
# controller starts them before the workers exist (tests/conftest.py), the workers and every CLI
# subprocess reach them through the environment, and the controller stops them after the
# workers. Starting them costs a core for tens of seconds; once per run, not once per worker.
SERVERS_STATE = "LEUKOFLOW_TEST_SERVERS"  # the folder holding servers.json and their logs
PREFECT_USER = "leukoflow"


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own home and SQLite database, basic auth on."""

    def __init__(self, api_url: str, auth_string: str, home: Path, client_home: Path) -> None:
        self.api_url = api_url
        self.auth_string = auth_string
        self.home = home  # the server's PREFECT_HOME: its SQLite database
        # The settings of every client process: API, authentication, a home of their own.
        self.env = {
            "PREFECT_HOME": str(client_home),
            "PREFECT_API_URL": api_url,
            "PREFECT_API_AUTH_STRING": auth_string,
        }

    @property
    def database(self) -> Path:
        return self.home / "prefect.db"

    @classmethod
    def start(cls, folder: Path) -> tuple[PrefectServer, Server]:
        """Start the server (without waiting for it: healthy() tells when it answers)."""
        import secrets

        home, client_home = folder / "prefect-server", folder / "prefect-client"
        home.mkdir()
        client_home.mkdir()
        port = free_port()
        auth_string = f"{PREFECT_USER}:{secrets.token_hex(16)}"
        settings = {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_API_AUTH_STRING": auth_string,
        }
        server = Server(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_env(**settings), home, marker=str(home),
        )  # fmt: skip
        return cls(f"http://127.0.0.1:{port}/api", auth_string, home, client_home), server

    def healthy(self) -> bool:
        return http_json(f"{self.api_url}/health", timeout_s=2) is True

    def call(self, method: str, path: str, body: dict | None = None):
        """One REST call to the server's API, authenticated; the decoded JSON answer."""
        import base64

        request = urllib.request.Request(
            f"{self.api_url}/{path.lstrip('/')}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": "Basic " + base64.b64encode(self.auth_string.encode()).decode(),
                "Content-Type": "application/json",
            },
        )
        # A loaded SQLite-backed server answers 503 while its database is busy (its scheduler
        # writes upcoming runs on its own loop): retry a few times before failing the test.
        for attempt in range(5):
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as error:
                if error.code != 503 or attempt == 4:
                    raise
                time.sleep(2 * (attempt + 1))  # a retry's backoff, not a synchronisation


class S3Endpoint:
    """moto's S3 server on 127.0.0.1, and the AWS environment a client needs to reach it."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        # Recognisable fake credentials, so tests can prove they leak nowhere.
        self.env = {
            "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
            # Never a developer's real profile or credentials file.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    @classmethod
    def start(cls, folder: Path) -> tuple[S3Endpoint, Server]:
        import secrets

        port = free_port()
        server = Server(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            server_env(), folder, marker=f"moto.server -H 127.0.0.1 -p {port} ",
        )  # fmt: skip
        secret = f"leukoflow-test-secret-{secrets.token_hex(8)}"
        return cls(f"http://127.0.0.1:{port}", secret), server

    def healthy(self) -> bool:
        return port_open(int(self.url.rsplit(":", 1)[1]))

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.url,
            key=self.env["AWS_ACCESS_KEY_ID"],
            secret=self.env["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )

    def make_bucket(self, prefix: str = "leukoflow") -> str:
        """A new empty bucket (a fresh name per call, so tests never see each other's objects)."""
        import uuid

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.filesystem().mkdir(name)
        return name


class SharedServers:
    """The run's Prefect and moto servers: started by the controller, found by the workers."""

    def __init__(self, folder: Path, prefect: PrefectServer, s3: S3Endpoint) -> None:
        self.folder, self.prefect, self.s3 = folder, prefect, s3

    @classmethod
    def start(cls) -> tuple[SharedServers, list[Server]]:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="lf-servers-", dir="/tmp"))
        prefect, prefect_process = PrefectServer.start(folder)
        s3, moto_process = S3Endpoint.start(folder)
        shared = cls(folder, prefect, s3)
        (folder / "servers.json").write_text(
            json.dumps({
                "prefect": [prefect.api_url, prefect.auth_string, str(prefect.home),
                            prefect.env["PREFECT_HOME"]],
                "s3": [s3.url, s3.env["AWS_SECRET_ACCESS_KEY"]],
            })
        )  # fmt: skip
        return shared, [prefect_process, moto_process]

    @classmethod
    def find(cls) -> SharedServers:
        """The servers the controller started (its folder is named in the environment)."""
        folder = Path(os.environ[SERVERS_STATE])
        state = json.loads((folder / "servers.json").read_text())
        api_url, auth_string, home, client_home = state["prefect"]
        prefect = PrefectServer(api_url, auth_string, Path(home), Path(client_home))
        return cls(folder, prefect, S3Endpoint(*state["s3"]))

    def wait(self, name: str, healthy: Callable[[], bool], timeout_s: float = 240) -> None:
        """Until `healthy()`; on time-out, fail with the server's log (`name`.log)."""
        deadline = time.monotonic() + timeout_s
        while not healthy():
            if time.monotonic() > deadline:
                tail = "".join(
                    p.read_text(errors="replace")[-3000:] for p in self.folder.rglob(f"{name}.log")
                )
                raise AssertionError(f"{name} did not answer within {timeout_s} s:\n{tail}")
            time.sleep(0.2)  # polling a real condition


# -- a two-node Ray cluster --------------------------------------------------------------------
class RayCluster:
    """A head and a second node started with `ray start --block`: token auth on, 127.0.0.1, one
    CPU each, health-checked every second so a lost node is declared dead in seconds."""

    def __init__(self, temp_dir: Path) -> None:
        import secrets

        self.temp_dir = temp_dir  # Ray puts Unix sockets under it: keep its path short
        self.token = secrets.token_hex(32)
        token_file = temp_dir / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        # Token authentication settings every client process needs.
        self.env = server_env(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
            RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )  # fmt: skip
        self.gcs_port, self.client_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"  # what --ray-address takes
        self.client_address = f"ray://127.0.0.1:{self.client_port}"  # for remote drivers
        self.dashboard = f"http://127.0.0.1:{free_port()}"  # the state API
        self.node_resources = {"leukoflow_head": "head", "leukoflow_worker": "worker"}
        self.head: Server | None = None
        self.worker: Server | None = None
        self._workers = 0

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _common(self) -> list[str]:
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir",
                str(self.temp_dir)]  # fmt: skip

    def start(self) -> RayCluster:
        dashboard_port = self.dashboard.rsplit(":", 1)[1]
        self.head = Server(
            "ray-head",
            [
                str(BIN / "ray"), "start", "--head", "--block", *self._common(),
                "--port", str(self.gcs_port),
                "--resources", json.dumps({"leukoflow_head": 1}),
                "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", dashboard_port,
                "--dashboard-agent-listen-port", str(free_port()),
                "--ray-client-server-port", str(self.client_port),
                "--disable-usage-stats",
            ],
            self.env, self.temp_dir, marker=str(self.temp_dir),
        )  # fmt: skip
        wait_until(lambda: port_open(self.gcs_port), 60, "the Ray head's GCS port", self.head)
        wait_until(
            lambda: http_json(f"{self.dashboard}/api/version", self.auth_header),
            60, "the Ray dashboard", self.head,
        )  # fmt: skip
        self.restart_worker()
        return self

    def restart_worker(self) -> None:
        """Start a (new) second node and wait until two nodes are alive: after a test killed it."""
        if self.worker is not None and self.worker.alive():
            return
        self._workers += 1
        self.worker = Server(
            f"ray-worker-{self._workers}",
            [
                str(BIN / "ray"), "start", "--block", *self._common(),
                "--address", self.address,
                "--resources", json.dumps({"leukoflow_worker": 1}),
                "--dashboard-agent-listen-port", str(free_port()),
            ],
            self.env, self.temp_dir, marker=str(self.temp_dir),
        )  # fmt: skip
        wait_until(lambda: len(self.alive_nodes()) == 2, 90, "both Ray nodes alive", self.worker)

    def stop(self) -> None:
        for server in (self.worker, self.head):
            if server is not None:
                server.stop()
        kill_processes_naming(str(self.temp_dir))

    def alive_nodes(self) -> list[dict]:
        answer = http_json(f"{self.dashboard}/api/v0/nodes?detail=1", self.auth_header) or {}
        rows = ((answer.get("data") or {}).get("result") or {}).get("result") or []
        return [row for row in rows if row["state"] == "ALIVE"]

    def log_tails(self, *patterns: str, chars: int = 2000) -> str:
        """The ends of the cluster's log files named like `patterns`, for a failing assertion."""
        logs = self.temp_dir / "session_latest" / "logs"
        files = sorted({f for pattern in patterns for f in logs.glob(pattern)})
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-chars:]}" for f in files)

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Rows of Ray's state API (`/api/v0/<resource>`), authenticated with the token."""
        query = "detail=1&limit=1000"
        for key, value in filters.items():
            query += f"&filter_keys={key}&filter_predicates=%3D&filter_values={value}"
        answer = http_json(f"{self.dashboard}/api/v0/{resource}?{query}", self.auth_header)
        assert answer and answer.get("result"), answer
        return answer["data"]["result"]["result"]
