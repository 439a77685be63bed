"""One messy corpus and two real `leukoflow run`s over it, shared by the bad-input and security
tests (each CLI run costs tens of seconds; the assertions are cheap)."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .corpus import Expected, make_messy_folder, make_messy_manifest
from .harness import (
    FAKE_SECRETS,
    SMALL_RUN,
    WITHOUT_DAC_OVERRIDE,
    end_process_group,
    isolated_env,
    leukoflow,
    wait_for,
)

FOLDER_DATASET = "messy-folder"
MANIFEST_DATASET = "messy-manifest"


@dataclass
class MessyRuns:
    base: Path
    images: Path
    store: Path
    expected: dict[str, dict[str, Expected]]  # dataset -> uri -> expected
    runs: dict[str, subprocess.CompletedProcess]  # dataset -> its `leukoflow run`
    status_json: subprocess.CompletedProcess
    status_text: subprocess.CompletedProcess
    prefect_db: Path

    def outputs(self) -> list[subprocess.CompletedProcess]:
        return [*self.runs.values(), self.status_json, self.status_text]

    def prefect_rows(self, sql: str) -> list[tuple]:
        """Rows of the runs' own Prefect database (logs, artifacts), read after the fact."""
        with sqlite3.connect(self.prefect_db) as db:
            return db.execute(sql).fetchall()


@dataclass
class Cli:
    """Where the CLI runs of these tests report: one Prefect server, one database."""

    home: Path
    api_url: str

    @property
    def prefect_db(self) -> Path:
        return self.home / "prefect-home" / "prefect.db"

    def env(self, **extra: str) -> dict[str, str]:
        return isolated_env(self.home, PREFECT_API_URL=self.api_url, **extra)


@pytest.fixture(scope="session")
def cli(tmp_path_factory) -> Iterator[Cli]:
    """A Prefect server on 127.0.0.1 for every CLI run of these tests: each run saves the start of
    an ephemeral server, and the one database ends up holding every run's logs and artifacts for
    the security scan."""
    home = tmp_path_factory.mktemp("cli-home")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(home / "prefect-server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=isolated_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: _healthy(api_url) or server.poll() is not None, 180, "Prefect server")
        assert server.poll() is None, (home / "prefect-server.log").read_text()[-3000:]
        yield Cli(home, api_url)
    finally:
        end_process_group(server)
        log.close()


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def messy_runs(tmp_path_factory, cli) -> MessyRuns:
    """`leukoflow run` on a folder, then a manifest, of bad files mixed with good cells, with
    fake credentials in the environment and without root's power to read any file."""
    base = tmp_path_factory.mktemp("messy")
    images = base / "images"
    expected = {FOLDER_DATASET: make_messy_folder(images)}
    manifest, expected[MANIFEST_DATASET] = make_messy_manifest(images, base / "outside.bmp")
    store = base / "store"
    env = cli.env(RAY_AUTH_MODE="token", **FAKE_SECRETS)
    common = ("--store", store, *SMALL_RUN, "--batch-size", "8", "--json")
    runs = {
        FOLDER_DATASET: leukoflow(
            "run", images, "--dataset", FOLDER_DATASET, *common,
            env=env, prefix=WITHOUT_DAC_OVERRIDE,
        ),
        MANIFEST_DATASET: leukoflow(
            "run", manifest, "--dataset", MANIFEST_DATASET, *common,
            env=env, prefix=WITHOUT_DAC_OVERRIDE,
        ),
    }  # fmt: skip
    return MessyRuns(
        base=base,
        images=images,
        store=store,
        expected=expected,
        runs=runs,
        status_json=leukoflow("status", "--store", store, "--json", env=env),
        status_text=leukoflow("status", "--store", store, env={**env, "COLUMNS": "200"}),
        prefect_db=cli.prefect_db,
    )
