"""Security: models load only through skops' trusted types, credentials show up nowhere, logs and
artifacts name images by content id and subjects by pseudonym, Ray's token auth stays on.

The runs scanned are the bad-input runs of conftest.py (fake credentials in their environment),
the runs below, and whatever other test of this folder ran earlier in the session: they all share
one Prefect database, whose logs and artifacts are read back after the fact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import psutil
import pytest
import skops.io as sio
from cli import leukoflow_here

from leukoflow.store import registry
from leukoflow.store.lease import SWEEP_LEASE, StoreLease, lease_location
from leukoflow.store.model_io import model_to_bytes
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog, read_predictions

from .conftest import MANIFEST_DATASET
from .harness import (
    FAKE_SECRETS,
    Background,
    assert_one_line_error,
    isolated_env,
    last_json,
    leukoflow,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PRODUCT = [REPO / name for name in ("leukoflow", "tasks", "flows", "infra", "deployments")]


@pytest.fixture
def store_copy(messy_runs, tmp_path) -> Path:
    """A private copy of the bad-input runs' store (a vgg16 32 px model is current)."""
    return Path(shutil.copytree(messy_runs.store, tmp_path / "store"))


def inbox_of_known_cells(messy_runs, folder: Path, n: int = 6) -> Path:
    """New files for a sweep, with bytes the store already has vectors for (no extraction)."""
    folder.mkdir()
    cells = sorted((messy_runs.images / "fold_0").rglob("UID_*.bmp"))[:: 24 // n][:n]
    for cell in cells:
        shutil.copy(cell, folder / cell.name)
    return folder


# -- models: skops with a trusted-type list, never pickle ------------------------------------
def test_a_tampered_model_file_is_refused_by_score_and_explain(
    messy_runs, store_copy, capsys, tmp_path
):
    root = open_location(str(store_copy))
    model_id = registry.current_model_id(root)
    model, _ = registry.load_model(root, model_id)
    model.steps[-1][1].smuggled = os.system  # what an attacker would want called on load
    tampered = model_to_bytes(model)
    assert "posix.system" in sio.get_untrusted_types(data=tampered)
    (store_copy / "models" / model_id / "model.skops").write_bytes(tampered)

    # The CLI's entry point in this process (a separate process's exit 1 and one line:
    # tests/cli/test_main.py::test_the_script_keeps_the_conventions).
    inbox = inbox_of_known_cells(messy_runs, tmp_path / "inbox")
    score = leukoflow_here(capsys, "score", inbox, "--store", store_copy)
    # A model whose bytes changed since it was saved is refused: exit 1, one line naming why.
    refused = {"code": 1, "prefix": "refused"}
    line = assert_one_line_error(score, "model file refused", "untrusted types", "posix.system",
                                 **refused)  # fmt: skip
    assert "model.skops is not the file that was saved" in line
    cell = next(inbox.iterdir())
    explain = leukoflow_here(capsys, "explain", cell, "--store", store_copy,
                                   "--out", tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(explain, "model file refused", "posix.system", **refused)
    assert not (tmp_path / "x.png").exists()
    assert read_predictions(root).num_rows == 0  # nothing was scored with it


def test_no_product_code_unpickles_anything():
    pattern = re.compile(
        r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bjoblib\.load\(|read_pickle\(|allow_pickle=True"
    )
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in PRODUCT
        for path in folder.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


# -- subject ids: pseudonymous keys in what the Prefect UI shows ------------------------------
def test_the_nightly_subject_table_shows_pseudonymous_keys(
    messy_runs, store_copy, cli, prefect_server, tmp_path
):
    inbox = inbox_of_known_cells(messy_runs, tmp_path / "inbox")
    result = leukoflow("score", inbox, "--store", store_copy, "--json",
                       env=cli.env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = last_json(result.stdout)
    root = open_location(str(store_copy))
    subjects = set(read_predictions(root).column("subject_id").to_pylist())
    assert len(subjects) >= 3 and None not in subjects  # C-NMC names carry subject ids
    salt = subject_salt(root)
    # The run's one Prefect server holds every test's artifacts: this sweep's is the one whose
    # description names its run id.
    artifacts = prefect_server.call(
        "POST", "artifacts/filter",
        {"artifacts": {"key": {"any_": ["nightly-subjects"]}}, "sort": "CREATED_DESC",
         "limit": 200},
    )  # fmt: skip
    [table] = [a["data"] for a in artifacts if summary["run_id"] in (a["description"] or "")]
    table = json.loads(table) if isinstance(table, str) else table
    shown = {row["subject"] for row in table}
    assert shown == {subject_key(s, salt) for s in subjects}
    assert all(re.fullmatch(r"S-[0-9a-f]{12}", key) for key in shown)
    assert not shown & subjects


def test_subject_keys_are_stable_in_a_store_and_unlinkable_across_stores(tmp_path):
    first, other = open_location(str(tmp_path / "a")), open_location(str(tmp_path / "b"))
    salt = subject_salt(first)
    assert subject_salt(first) == salt and len(salt) == 32  # made once, then read back
    assert subject_key("MRN-4471", salt) == subject_key("MRN-4471", subject_salt(first))
    assert subject_key("MRN-4471", salt) != subject_key("MRN-4471", subject_salt(other))
    assert subject_key(None, salt) is None


# -- credentials -----------------------------------------------------------------------------
def secrets_in(text: str | bytes, secrets: list[str]) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [secret for secret in secrets if secret.encode() in data]


def test_credentials_appear_in_no_output_file_table_log_or_artifact(messy_runs, s3_endpoint):
    secrets = [*FAKE_SECRETS.values(), s3_endpoint.env["AWS_SECRET_ACCESS_KEY"]]
    for result in messy_runs.outputs():
        assert secrets_in(result.stdout + result.stderr, secrets) == []
    for path in messy_runs.store.rglob("*"):
        if path.is_file():
            assert secrets_in(path.read_bytes(), secrets) == [], path
    # The Prefect database of every CLI run of this folder: logs, artifacts, flow parameters.
    for path in messy_runs.prefect_db.parent.glob("prefect.db*"):
        assert secrets_in(path.read_bytes(), secrets) == [], path


def test_credentials_in_an_endpoint_url_never_reach_the_error_line(cli, tmp_path):
    closed = "http://leakuser:LeakPass0005@127.0.0.1:9"  # a password in the endpoint URL
    (tmp_path / "all").mkdir()
    result = leukoflow(
        "run", tmp_path, "--store", "s3://bucket/store", "--weights", "none",
        env=cli.env(AWS_ENDPOINT_URL=closed, LEUKOFLOW_S3_MAX_ATTEMPTS="1",
                         RAY_AUTH_MODE="token", **FAKE_SECRETS),
    )  # fmt: skip
    assert_one_line_error(result, "cannot reach the store s3://bucket/store")
    assert secrets_in(result.stdout + result.stderr, [*FAKE_SECRETS.values(), "LeakPass0005"]) == []


def test_the_cli_masks_credentials_in_whatever_it_shows(monkeypatch):
    from leukoflow.cli import redact

    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    text = (f"failed with key {FAKE_SECRETS['AWS_SECRET_ACCESS_KEY']} at "
            "https://user:LeakPass0005@minio:9000/bucket and token "
            f"{FAKE_SECRETS['RAY_AUTH_TOKEN']}")  # fmt: skip
    masked = redact(text)
    assert secrets_in(masked, [*FAKE_SECRETS.values(), "LeakPass0005"]) == []
    assert "https://***@minio:9000/bucket" in masked and masked.count("***") == 3


# -- logs and artifacts: content ids, never paths or subject ids ------------------------------
def test_info_logs_and_artifacts_name_no_file_path_and_no_subject_id(messy_runs):
    # Tokens only a file path or a subject id can contain (C-NMC names carry subject ids).
    tokens = [str(messy_runs.images), "UID_", "MRN-", "cell with spaces", "ünïcødé", "we$ird",
              "twin_other_label", "locked.bmp", "MANIFEST.csv", "outside.bmp"]  # fmt: skip
    logs = messy_runs.prefect_rows("select level, message from log")
    info = [message for level, message in logs if level <= 20]
    assert any(message.startswith("catalog messy-") for message in info)  # the runs' logs
    # Subject ids: at no level at all (the MRN-like ids of the manifest).
    assert [message for _, message in logs if "MRN-" in message] == []
    artifacts = messy_runs.prefect_rows("select key, description, data from artifact")
    assert {"evaluation-report", "evaluation-metrics"} <= {key for key, _, _ in artifacts}
    texts = [*info, *(f"{key} {text} {data}" for key, text, data in artifacts)]
    for result in messy_runs.runs.values():
        texts += [line for line in result.stderr.splitlines() if "| INFO " in line]
    leaks = [(token, text[:200]) for text in texts for token in tokens if token in text]
    assert leaks == []
    # The manifest's subject ids are in the store's tables, where they belong.
    catalog = read_catalog(open_location(str(messy_runs.store)), MANIFEST_DATASET)
    assert any(s.startswith("MRN-4471") for s in catalog.column("subject_id").to_pylist() if s)


# -- Ray and servers -------------------------------------------------------------------------
def test_no_product_code_turns_ray_auth_off_or_listens_on_every_interface():
    """Ray's token auth is never disabled; 0.0.0.0 appears only inside compose containers,
    whose published ports are loopback-only (checked in tests/infra/test_infra_files.py)."""
    disabled = re.compile(r"RAY_AUTH_MODE\W+disabled|auth_mode\W+disabled", re.IGNORECASE)
    offenders = []
    for folder in PRODUCT:
        for path in folder.rglob("*"):
            if not path.is_file() or path.suffix not in (".py", ".yaml", ".yml", "", ".toml"):
                continue
            text = path.read_text(errors="replace")
            if disabled.search(text):
                offenders.append(f"{path.relative_to(REPO)}: disables Ray auth")
            if "0.0.0.0" in text and path.name != "docker-compose.yml":
                offenders.append(f"{path.relative_to(REPO)}: 0.0.0.0")
    assert offenders == []


def test_prefect_servers_listen_on_loopback_unless_told_otherwise(messy_runs, store_copy, tmp_path):
    """The Prefect API a plain `leukoflow score` starts for itself (no PREFECT_API_URL: an
    ephemeral server) listens on 127.0.0.1 only: read from the server process's own sockets.

    The test holds the store's sweep lease, so the sweep waits for it with its API up: the
    sockets are read while the server certainly runs, then the sweep is ended."""
    (tmp_path / "ephemeral").mkdir()
    env = isolated_env(tmp_path / "ephemeral")  # its own Prefect home (database) under it
    for name in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        env.pop(name, None)
    root = open_location(str(store_copy))
    held = StoreLease(lease_location(root, SWEEP_LEASE), "sweep", run_id="security-test")
    held.acquire(0)
    inbox = inbox_of_known_cells(messy_runs, tmp_path / "inbox")
    sweep = Background("score", inbox, "--store", store_copy, "--wait", "600",
                       env=env, workdir=tmp_path / "sweep")  # fmt: skip
    try:
        listening = sweep.wait_for(
            lambda: prefect_api_sockets(sweep.members()), 240, "the sweep's own Prefect API"
        )
    finally:
        sweep.stop()
        held.release()
    addresses = {address for _, address in listening}
    assert addresses == {"127.0.0.1"}, listening


def prefect_api_sockets(pids: list[int]) -> list[tuple[int, str]]:
    """(port, address) of every TCP socket a Prefect API server process among `pids` listens
    on (Prefect's ephemeral server runs uvicorn on prefect.server.api.server:create_app)."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if "prefect.server.api.server:create_app" not in " ".join(process.cmdline()):
                continue
            sockets = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [(c.laddr.port, c.laddr.ip) for c in sockets if c.status == psutil.CONN_LISTEN]
    return found
