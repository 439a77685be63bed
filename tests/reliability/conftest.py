"""One messy corpus and two real `leukoflow run`s over it, shared by the bad-input and security
tests (each CLI run costs tens of seconds; the assertions are cheap). The CLI runs report to the
run's one Prefect server (tests/conftest.py)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .corpus import Expected, make_messy_folder, make_messy_manifest
from .harness import (
    FAKE_SECRETS,
    SMALL_RUN,
    WITHOUT_DAC_OVERRIDE,
    isolated_env,
    leukoflow,
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
    """Where the CLI runs of these tests report: the run's one Prefect server."""

    home: Path  # this file's CLI runs' own client home
    api_url: str
    prefect_db: Path  # the server's database: every run's logs and artifacts

    def env(self, **extra: str) -> dict[str, str]:
        return isolated_env(self.home, PREFECT_API_URL=self.api_url, **extra)


@pytest.fixture(scope="session")
def cli(tmp_path_factory, prefect_server) -> Cli:
    """CLI runs report to the run's Prefect server: no run pays the start of an ephemeral one."""
    return Cli(tmp_path_factory.mktemp("cli-home"), prefect_server.api_url, prefect_server.database)


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
        prefect_db=_own_rows(cli.prefect_db, store, base / "prefect" / "prefect.db"),
    )


def _own_rows(server_db: Path, store: Path, copy: Path) -> Path:
    """A copy of the server's database holding only the logs and artifacts of the flow runs
    over `store`: the server is shared by every test of the run, and the scans of these tests
    must not depend on what the other worker happens to have logged by then."""
    copy.parent.mkdir()
    with sqlite3.connect(server_db) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    with sqlite3.connect(copy) as db:
        own = "select id from flow_run where parameters like ?"
        pattern = f"%{json.dumps(str(store))[1:-1]}%"
        for table in ("log", "artifact"):
            db.execute(f"delete from {table} where flow_run_id not in ({own}) "
                       "or flow_run_id is null", (pattern,))  # fmt: skip
        assert db.execute(own, (pattern,)).fetchall(), "no flow run of the messy runs"
    return copy
