"""`leukoflow export fhir` and `score --export-fhir` as a user meets them, against a real FHIR
server on loopback (stdlib http.server) that validates every resource it receives with
fhir.resources, keeps them by type and id as a server would, and can be told to fail."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from leukoflow.learn import calibration, train
from leukoflow.recipe import FeatureRecipe
from leukoflow.store import registry
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_runs, write_predictions
from leukoflow.vocabulary import NON_CLINICAL_NOTICE

from . import assert_user_error, leukoflow_here

NIGHT, NEXT = "2026-03-02", "2026-03-03"
MODEL = "m-cm"
TOKEN = "fhir-test-token-5f2c9a"
RAW = ("MRN-0001", "MRN-0002")


# -- a FHIR server on loopback ----------------------------------------------------------------
class FhirServer:
    """POST <base> takes a transaction Bundle: validated (Bundle and each resource, with
    fhir.resources R4B), each PUT stored at Type/id. `fail_next` answers that many requests with
    HTTP 503; `hold` keeps each answer until `release` is set (a server slower than the
    client's timeout)."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []  # headers and outcome of every POST
        self.invalid: list[str] = []
        self.fail_next = 0
        self.hold = False
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.requests.append({"auth": self.headers.get("Authorization"),
                                            "type": self.headers.get("Content-Type")})  # fmt: skip
                    failing = server.fail_next > 0
                    server.fail_next -= failing
                if server.hold:
                    server.release.wait(30)
                if failing:
                    return self.answer(503, {"resourceType": "OperationOutcome", "issue": []})
                status, answer = server.transaction(body)
                self.answer(status, answer)

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the timeout test)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def transaction(self, body: bytes) -> tuple[int, dict]:
        try:
            bundle = json.loads(body)
            Bundle.model_validate(bundle)
            assert bundle["type"] == "transaction"
            for entry in bundle["entry"]:
                resource = entry["resource"]
                get_fhir_model_class(resource["resourceType"]).model_validate(resource)
                assert entry["request"] == {
                    "method": "PUT",
                    "url": f"{resource['resourceType']}/{resource['id']}",
                }
        except Exception as error:  # the client sent something a FHIR server would refuse
            with self.lock:
                self.invalid.append(str(error))
            return 400, {"resourceType": "OperationOutcome", "issue": []}
        results = []
        with self.lock:
            for entry in bundle["entry"]:
                resource = entry["resource"]
                key = (resource["resourceType"], resource["id"])
                created = key not in self.resources
                self.resources[key] = resource
                results.append({"response": {"status": "201 Created" if created else "200 OK"}})
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": results}

    def of_type(self, kind: str) -> list[dict]:
        with self.lock:
            return [r for (k, _), r in self.resources.items() if k == kind]


@pytest.fixture
def server():
    fhir_server = FhirServer()
    fhir_server.thread.start()
    try:
        yield fhir_server
    finally:
        fhir_server.release.set()
        fhir_server.httpd.shutdown()
        fhir_server.httpd.server_close()


# -- a store with a model and two nights of predictions ---------------------------------------
def model_and_record() -> tuple:
    """A fitted classifier saved with a color_morphology recipe at random weights: no network
    to load, and a `--weights none` model, so every output must carry the notice."""
    rng = np.random.default_rng(0)
    recipe = FeatureRecipe(("color_morphology",), weights="none", image_size=32)
    x = rng.normal(size=(30, 4))
    y = (x[:, 0] > 0).astype(int)
    model = calibration.fit_calibrated("linear-svm", x, y, train.kfold(y, [None] * 30, n_folds=3))
    record = ModelRecord.from_dict(
        {
            "model_id": MODEL,
            "created_at": "2026-01-01T00:00:00+00:00",
            "dataset": "synthetic",
            "feature_recipe": recipe.to_record(),
            "non_clinical": recipe.non_clinical,
            "classifier": "linear-svm",
            "score_kind": "probability",
            "threshold": 0.5,
            "metrics": {"accuracy": 0.9},
        }
    )
    return model, record


def predictions(night: str) -> list[dict]:
    """MRN-0001: 6 of 8 cells flagged (flagged); MRN-0002: 1 of 4 (not)."""
    cells = [("MRN-0001", i < 6) for i in range(8)] + [("MRN-0002", i < 1) for i in range(4)]
    return [
        {"image_id": f"{night}-{n}", "subject_id": subject, "model_id": MODEL,
         "score": 0.9 if flagged else 0.1, "score_kind": "probability",
         "predicted_label": "all" if flagged else "hem", "threshold": 0.5, "run_id": "r-1"}
        for n, (subject, flagged) in enumerate(cells)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted():
    return model_and_record()


@pytest.fixture
def store(tmp_path, fitted, monkeypatch) -> Path:
    monkeypatch.delenv(registry.KEY_ENV, raising=False)
    monkeypatch.setenv("LEUKOFLOW_FHIR_TOKEN", TOKEN)
    root = open_location(str(tmp_path / "store"))
    registry.save_model(root, MODEL, *fitted)
    registry.promote(root, MODEL, force=True)
    for night in (NIGHT, NEXT):
        write_predictions(root, night, "r-1", predictions(night))
    return tmp_path / "store"


@pytest.fixture
def cli(capsys):
    return lambda *args: leukoflow_here(capsys, *args)


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def export(cli, store: Path, *args):
    return cli("export", "fhir", "--store", store, "--date", NIGHT, *args)


def no_secrets(result) -> None:
    for raw in (*RAW, TOKEN):
        assert raw not in result.stdout and raw not in result.stderr


# -- tests ------------------------------------------------------------------------------------
def test_export_writes_ndjson_into_the_store_or_a_folder(cli, store, tmp_path) -> None:
    done = export(cli, store, "--json")
    assert done.returncode == 0, done.stderr
    summary = last_json(done)
    folder = store / "exports" / "fhir" / f"date={NIGHT}"
    assert summary["folder"] == str(folder) and summary["status"] == "written"
    assert summary["resources"] == {"DiagnosticReport": 2, "Observation": 6}
    lines = (folder / "DiagnosticReport.ndjson").read_text().splitlines()
    assert len(lines) == 2 and all(
        NON_CLINICAL_NOTICE in json.loads(x)["conclusion"] for x in lines
    )
    assert json.loads((folder / "status.json").read_text())["status"] == "written"
    no_secrets(done)

    text = export(cli, store, "--out", tmp_path / "out")
    assert text.returncode == 0, text.stderr
    assert "2 subject(s), 1 flagged" in text.stdout and NON_CLINICAL_NOTICE in text.stdout
    assert len((tmp_path / "out" / "Observation.ndjson").read_text().splitlines()) == 6


def test_a_post_sends_a_valid_bundle_with_the_token_and_twice_adds_nothing(cli, store, server):
    for _ in range(2):
        sent = export(cli, store, "--fhir-url", server.url, "--json")
        assert sent.returncode == 0, sent.stderr
        assert last_json(sent)["status"] == "sent" and last_json(sent)["sent"]["entries"] == 8
        no_secrets(sent)
    assert server.invalid == []
    assert [r["auth"] for r in server.requests] == [f"Bearer {TOKEN}"] * 2
    assert {r["type"] for r in server.requests} == {"application/fhir+json"}
    reports = server.of_type("DiagnosticReport")
    assert len(reports) == 2 and len(server.of_type("Observation")) == 6  # no duplicates
    salt = subject_salt(open_location(str(store)))
    assert {r["subject"]["identifier"]["value"] for r in reports} == {
        subject_key(raw, salt) for raw in RAW
    }
    assert not any(raw in json.dumps(reports) for raw in RAW)


def test_a_mapped_export_names_patients_and_a_map_in_the_store_is_refused(
    cli, store, server, tmp_path
) -> None:
    mapping = tmp_path / "map.csv"
    mapping.write_text("subject_id,patient_reference\nMRN-0001,Patient/a1\nMRN-0002,Patient/b2\n")
    sent = export(cli, store, "--fhir-url", server.url, "--subject-map", mapping)
    assert sent.returncode == 0, sent.stderr
    assert {r["subject"]["reference"] for r in server.of_type("DiagnosticReport")} == {
        "Patient/a1",
        "Patient/b2",
    }
    inside = store / "map.csv"
    inside.write_text(mapping.read_text())
    refused = export(cli, store, "--fhir-url", server.url, "--subject-map", inside)
    assert_user_error(refused, "inside the store")
    no_secrets(refused)


def test_a_5xx_is_retried_and_a_failed_night_is_sent_with_the_next(cli, store, server) -> None:
    server.fail_next = 1  # one 503, then the retry goes through
    sent = export(cli, store, "--fhir-url", server.url, "--attempts", "2", "--json")
    assert sent.returncode == 0 and last_json(sent)["sent"]["attempts"] == 2
    server.resources.clear()

    server.fail_next = 2
    failed = export(cli, store, "--fhir-url", server.url, "--attempts", "2", "--json")
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert "HTTP 503" in failed.stderr and "sends it again" in failed.stderr
    assert last_json(failed)["status"] == "failed"
    folder = store / "exports" / "fhir" / f"date={NIGHT}"
    assert json.loads((folder / "status.json").read_text())["status"] == "failed"
    assert len((folder / "DiagnosticReport.ndjson").read_text().splitlines()) == 2
    assert server.resources == {}
    no_secrets(failed)

    # The next night's export finds the server back and sends the failed night too.
    later = cli("export", "fhir", "--store", store, "--date", NEXT, "--fhir-url", server.url,
                "--json")  # fmt: skip
    assert later.returncode == 0, later.stderr
    assert last_json(later)["resent"] == [{"date": NIGHT, "status": "sent", "reason": None}]
    assert json.loads((folder / "status.json").read_text())["status"] == "sent"
    assert len(server.of_type("DiagnosticReport")) == 4  # two subjects, two nights
    assert len({r["effectiveDateTime"] for r in server.of_type("DiagnosticReport")}) == 2
    assert server.invalid == []


def test_a_server_slower_than_the_timeout_fails_the_export_in_one_line(cli, store, server):
    server.hold = True
    failed = export(cli, store, "--fhir-url", server.url, "--timeout", "0.3", "--attempts", "1")
    server.release.set()
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "no answer from" in failed.stderr and "within 0.3 s" in failed.stderr
    no_secrets(failed)


def test_bad_input_is_one_line_and_exit_2(cli, store, tmp_path) -> None:
    cases = [
        (("--date", "2026-02-30"), "not a calendar date"),
        (("--date", "2026-04-01"), "no predictions for the night 2026-04-01"),
        (("--date", NIGHT, "--model", "m-absent"), "m-absent scored nothing"),
        (("--date", NIGHT, "--out", tmp_path, "--fhir-url", "http://127.0.0.1:9/f"), "not both"),
        (("--date", NIGHT, "--fhir-url", "ftp://host/fhir"), "http(s)://host/base"),
        (("--date", NIGHT, "--fhir-url", "https://u:pw@host/fhir"), "LEUKOFLOW_FHIR_TOKEN"),
        (("--date", NIGHT, "--subject-map", tmp_path / "absent.csv"), "no such file"),
    ]
    for args, words in cases:
        refused = cli("export", "fhir", "--store", store, *args)
        assert_user_error(refused, words)
        assert "pw@" not in refused.stderr
    assert_user_error(cli("export", "fhir", "--store", tmp_path / "nope", "--date", NIGHT),
                      "no store at")  # fmt: skip


def test_a_sweep_whose_post_fails_completes_and_its_run_row_says_so(
    cli, store, server, tmp_path, prefect_harness
) -> None:
    """One sweep end to end (an inbox with nothing new: the night's predictions are stored)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    server.fail_next = 3  # every attempt of the sweep's export
    swept = cli("score", inbox, "--store", store, "--date", NIGHT, "--export-fhir", server.url,
                "--json")  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    summary = last_json(swept)
    assert summary["outcome"] == "completed" and summary["fhir"]["status"] == "failed"
    assert "HTTP 503" in summary["fhir"]["reason"]
    runs = read_runs(open_location(str(store))).to_pylist()
    (row,) = [r for r in runs if r["run_id"] == summary["run_id"]]
    assert row["outcome"] == "completed"
    assert json.loads(row["details"])["fhir"]["status"] == "failed"
    assert server.resources == {}
    no_secrets(swept)

    # The NDJSON stayed in the store; the next export sends it, once.
    again = export(cli, store, "--fhir-url", server.url)
    assert again.returncode == 0, again.stderr
    again = export(cli, store, "--fhir-url", server.url)
    assert len(server.of_type("DiagnosticReport")) == 2 and server.invalid == []
    conclusions = {r["conclusion"].split(" (")[0] for r in server.of_type("DiagnosticReport")}
    assert conclusions == {"flagged for review", "not flagged"}
