"""Real servers for the scale-out tests: a two-node Ray cluster and a Prefect server.

Each fixture starts its processes with `servers.Server` (own process group, private temp
folder) and stops every one of them at teardown, also when the test failed.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import BIN, Server, free_port, http_json, port_open, server_env, wait_until

PREFECT_USER = "leukoflow"


@dataclass
class RayCluster:
    address: str  # HOST:PORT of the head's GCS, what --ray-address takes
    client_address: str  # ray://HOST:PORT of the head's Ray Client server, for remote drivers
    dashboard: str  # http://127.0.0.1:PORT: the state API
    env: dict  # token authentication settings every client process needs
    token: str
    temp_dir: Path
    node_resources: dict[str, str]  # custom resource -> which node carries it

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

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


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a second node started with `ray start --block`, token auth on, 1 CPU each."""
    # Ray puts Unix sockets under the temp dir: keep its path short.
    temp_dir = Path(tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = server_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    gcs_port, dashboard_port, client_port = free_port(), free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", str(temp_dir)]
    head = Server(
        "ray-head",
        [
            str(BIN / "ray"), "start", "--head", "--block", *common,
            "--port", str(gcs_port),
            "--resources", json.dumps({"leukoflow_head": 1}),
            "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port),
            "--dashboard-agent-listen-port", str(free_port()),
            "--ray-client-server-port", str(client_port),
            "--disable-usage-stats",
        ],
        env, temp_dir, marker=str(temp_dir),
    )  # fmt: skip
    servers = [head]
    try:
        wait_until(lambda: port_open(gcs_port), 60, "the Ray head's GCS port", head)
        worker = Server(
            "ray-worker",
            [
                str(BIN / "ray"), "start", "--block", *common,
                "--address", f"127.0.0.1:{gcs_port}",
                "--resources", json.dumps({"leukoflow_worker": 1}),
                "--dashboard-agent-listen-port", str(free_port()),
            ],
            env, temp_dir, marker=str(temp_dir),
        )  # fmt: skip
        servers.append(worker)
        cluster = RayCluster(
            address=f"127.0.0.1:{gcs_port}",
            client_address=f"ray://127.0.0.1:{client_port}",
            dashboard=f"http://127.0.0.1:{dashboard_port}",
            env=env,
            token=token,
            temp_dir=temp_dir,
            node_resources={"leukoflow_head": "head", "leukoflow_worker": "worker"},
        )
        wait_until(
            lambda: http_json(f"{cluster.dashboard}/api/version", cluster.auth_header),
            60, "the Ray dashboard", head,
        )  # fmt: skip
        wait_until(
            lambda: len([n for n in cluster.state("nodes") if n["state"] == "ALIVE"]) == 2,
            60, "both Ray nodes to be alive", worker,
        )  # fmt: skip
        yield cluster
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class PrefectServer:
    api_url: str  # what PREFECT_API_URL takes
    auth_string: str  # user:password of the server's basic authentication
    home: Path  # PREFECT_HOME: profiles, the SQLite database, local result storage
    env: dict  # settings of every client process: API, authentication, home

    def call(self, method: str, path: str, body: dict | None = None):
        """One REST call to the server's API, authenticated; the decoded JSON answer."""
        import base64
        import time
        import urllib.error
        import urllib.request

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
                time.sleep(2 * (attempt + 1))


@pytest.fixture(scope="session")
def prefect_server():
    """`prefect server start` on 127.0.0.1 with its own home and SQLite database, basic auth on."""
    home = Path(tempfile.mkdtemp(prefix="lf-prefect-", dir="/tmp"))
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
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: http_json(f"{api_url}/health") is True, 120, "the Prefect API", server)
        yield PrefectServer(
            api_url=api_url,
            auth_string=auth_string,
            home=home,
            env={
                "PREFECT_HOME": str(home),
                "PREFECT_API_URL": api_url,
                "PREFECT_API_AUTH_STRING": auth_string,
            },
        )
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
