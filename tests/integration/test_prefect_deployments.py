"""deployments/prefect.yaml on a real `prefect server start`, its runs executed by a real worker.

`leukoflow deploy` registers the deployments; a process worker of the `leukoflow` pool runs a
training run (on demand) and then the nightly sweep, triggered now instead of at 02:00. The
worker holds LEUKOFLOW_MODEL_KEY: the model it trains is signed, the nightly scores with it, and
a night whose process lacks the key fails instead of scoring.

The server is the run's one Prefect server, shared with every other test: everything here is
read by this module's own deployment ids and flow run ids, never "the latest" of anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from servers import BIN, Server, http_status, last_json_line, run_cli, server_env, wait_until

from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.store import registry
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_predictions, read_runs

pytestmark = pytest.mark.integration

TIMEZONE = "Europe/Berlin"
N_IMAGES = 8
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


# Recognisable fake credentials in the worker's environment, and MRN-like subject ids in the
# manifests: neither may reach the server's database, the worker's output or the store's pages.
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEWORKERLEAK0001",
    "AWS_SECRET_ACCESS_KEY": "fakeWorkerSecretLeak/0002+xyz",
    "RAY_AUTH_TOKEN": "fakeworkerraytokenleak0004",
}
# The worker's model key (a secret as well: it must not reach the database or the output).
MODEL_KEY = "worker-model-key-leak0005"


def mrn_manifest(folder: Path) -> Path:
    """MANIFEST.csv beside the cells: their paths, labels and an MRN-like id per subject."""
    lines = ["path,label,subject_id"]
    for cell in sorted(folder.rglob("*.bmp")):
        subject = cell.name.split("_")[1]
        lines.append(f"{cell.relative_to(folder)},{cell.parent.name},MRN-00{subject}-771")
    manifest = folder / "MANIFEST.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """`leukoflow deploy` against the server; the inbox holds the training cells again, both
    listed by manifests whose subject ids look like medical record numbers."""
    workdir = tmp_path_factory.mktemp("deployments")
    images = make_synthetic_dataset(
        workdir / "images", n_subjects=4, cells_per_subject=2, image_side=48
    )
    mrn_manifest(images)
    inbox = workdir / "inbox"
    shutil.copytree(images, inbox)
    store = workdir / "store"
    result = run_cli(
        [
            "deploy",
            "--store",
            str(store),
            "--inbox",
            str(inbox / "MANIFEST.csv"),
            "--timezone",
            TIMEZONE,
            "--json",
        ],
        env=server_env(**prefect_server.env),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = last_json_line(result.stdout)
    return {"report": report, "images": images, "inbox": inbox, "store": store}


@pytest.fixture(scope="module")
def worker(prefect_server, deployed):
    """`prefect worker start --pool leukoflow`, polling every second, stopped after the module."""
    scratch = Path(tempfile.mkdtemp(prefix="lf-worker-", dir="/tmp"))  # short: Ray's sockets
    env = server_env(
        TMPDIR=str(scratch), PREFECT_WORKER_QUERY_SECONDS="1", LEUKOFLOW_MODEL_KEY=MODEL_KEY,
        **FAKE_SECRETS, **prefect_server.env,
    )  # fmt: skip
    server = Server(
        "prefect-worker",
        [str(BIN / "prefect"), "worker", "start", "--pool", "leukoflow"],
        env,
        scratch,
        marker=str(scratch),
    )
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def deployment(prefect_server, name: str) -> dict:
    return prefect_server.call("GET", f"deployments/name/{name}")


def run_to_the_end(
    prefect_server, worker, name: str, parameters: dict, job_variables: dict | None = None
) -> dict:
    """Trigger deployment `name` now and wait until the worker has run it to a final state."""
    created = prefect_server.call(
        "POST", f"deployments/{deployment(prefect_server, name)['id']}/create_flow_run",
        {"parameters": parameters, "job_variables": job_variables or {}},
    )  # fmt: skip

    def finished():
        run = prefect_server.call("GET", f"flow_runs/{created['id']}")
        return run if run["state_type"] in FINAL_STATES else None

    return wait_until(finished, 300, f"the {name} run", worker)


def test_deploy_registers_three_deployments_on_the_process_pool(prefect_server, deployed):
    names = {d["name"] for d in deployed["report"]["deployments"]}
    assert names == {
        "leukoflow-score/nightly",
        "leukoflow-backfill/backfill",
        "leukoflow-run/train",
    }
    pool = prefect_server.call("GET", "work_pools/leukoflow")
    assert pool["type"] == "process"
    for name in names:
        assert deployment(prefect_server, name)["work_pool_name"] == "leukoflow"
    nightly = deployment(prefect_server, "leukoflow-score/nightly")
    assert nightly["entrypoint"] == "flows/score.py:score_inbox"
    assert nightly["parameters"] == {
        "inbox": str(deployed["inbox"] / "MANIFEST.csv"),
        "store": str(deployed["store"]),
    }
    # One sweep at a time: Prefect cancels a night that starts while another still runs.
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"


def test_the_server_refuses_clients_without_the_auth_string(prefect_server, deployed):
    assert http_status(f"{prefect_server.api_url}/work_pools/leukoflow") == 401


def test_the_nightly_runs_at_two_in_the_given_timezone(prefect_server, deployed):
    nightly = deployment(prefect_server, "leukoflow-score/nightly")
    [schedule] = nightly["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == TIMEZONE
    for name in ("leukoflow-backfill/backfill", "leukoflow-run/train"):
        assert deployment(prefect_server, name)["schedules"] == []  # on demand only

    # The server's scheduler service creates the upcoming runs on its own loop, so a loaded
    # machine may not have them yet when `deploy` reads back: wait for them.
    def scheduled_runs():
        runs = prefect_server.call(
            "POST",
            "flow_runs/filter",
            {"deployments": {"id": {"any_": [nightly["id"]]}}, "limit": 3},
        )
        return [run["expected_start_time"] for run in runs if run["expected_start_time"]]

    upcoming = wait_until(scheduled_runs, 120, "the nightly's scheduled runs")
    for start in upcoming:
        local = datetime.fromisoformat(start).astimezone(ZoneInfo(TIMEZONE))
        assert (local.hour, local.minute) == (2, 0)


def test_a_worker_runs_training_then_the_nightly_sweep(prefect_server, deployed, worker):
    train = run_to_the_end(
        prefect_server, worker, "leukoflow-run/train",
        # The recipe travels as a dict: Prefect validates it into a FeatureRecipe.
        {"images": str(deployed["images"] / "MANIFEST.csv"),
         "recipe": {"backbones": ["vgg16"], "weights": "none", "image_size": 32}},
    )  # fmt: skip
    assert train["state_type"] == "COMPLETED", worker.output()[-4000:]
    store = open_location(str(deployed["store"]))
    # The worker holds LEUKOFLOW_MODEL_KEY: the model it trained is signed under that key.
    model_id = registry.current_model_id(store)
    integrity = json.loads((deployed["store"] / "models" / model_id / "integrity.json").read_text())
    message = json.dumps({"model_id": model_id, "files": integrity["files"]}, sort_keys=True)
    expected = hmac.new(MODEL_KEY.encode(), message.encode(), hashlib.sha256).hexdigest()
    assert integrity["signature"] == f"hmac-sha256:{expected}"

    nightly = run_to_the_end(prefect_server, worker, "leukoflow-score/nightly", {})
    assert nightly["state_type"] == "COMPLETED", worker.output()[-4000:]
    predictions = read_predictions(store)
    assert predictions.num_rows == N_IMAGES
    assert set(predictions.column("model_id").to_pylist()) == {model_id}  # the signed model
    assert set(predictions.column("run_id").to_pylist()) == {predictions["run_id"][0].as_py()}

    # A night whose process lacks the key (the flow run's environment sets it empty, which
    # leukoflow reads as unset: a worker without it) fails, and scores nothing.
    keyless = run_to_the_end(
        prefect_server, worker, "leukoflow-score/nightly", {},
        job_variables={"env": {"LEUKOFLOW_MODEL_KEY": ""}},
    )  # fmt: skip
    assert keyless["state_type"] == "FAILED", worker.output()[-4000:]
    assert "LEUKOFLOW_MODEL_KEY is not set here" in keyless["state"]["message"]
    assert read_predictions(store).num_rows == N_IMAGES
    kinds = sorted(read_runs(store).column("kind").to_pylist())
    assert kinds == ["run", "score"]

    # Flow runs a worker starts install the masking and the pseudonyms themselves (no CLI in
    # their process): nothing of either, nor the model key, reaches the server's database, the
    # worker's output or any file of the store but its Parquet tables.
    subjects = set(predictions.column("subject_id").to_pylist())
    assert subjects and all(s.startswith("MRN-") for s in subjects)
    texts = {"worker": worker.output()}
    for path in [*prefect_server.home.rglob("prefect.db*"), *deployed["store"].rglob("*")]:
        if path.is_file() and path.suffix != ".parquet":
            texts[str(path)] = path.read_bytes().decode("latin-1")
    tokens = [*subjects, *FAKE_SECRETS.values(), MODEL_KEY]
    assert [(where, t) for where, text in texts.items() for t in tokens if t in text] == []


def test_deploy_refuses_a_wrong_time_zone_and_a_missing_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from leukoflow.deploy import placeholder_values, require_prefect_api
    from leukoflow.errors import LeukoflowError

    with pytest.raises(LeukoflowError, match="--timezone"):
        placeholder_values("store", "inbox", "Mars/Olympus_Mons", tmp_path)
    with temporary_settings(updates={PREFECT_API_URL: None}):
        with pytest.raises(LeukoflowError, match="PREFECT_API_URL"):
            require_prefect_api()
    values = placeholder_values("store", "s3://bucket/inbox", "UTC", tmp_path)
    assert values["LEUKOFLOW_STORE"] == str(Path.cwd() / "store")  # the worker's cwd differs
    assert values["LEUKOFLOW_INBOX"] == "s3://bucket/inbox"
