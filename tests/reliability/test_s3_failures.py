"""What the store does when S3 answers badly: access denied, throttling and server errors, an
endpoint that goes away in the middle of a model save or a promotion, and several writers racing
on one object. In this process, against moto's server (the run's shared one) through the TCP
proxy of tests/reliability/proxy.py, which answers the errors on the wire (real HTTP 403, 500,
503 answers, as S3 writes them) and stops the endpoint at a chosen request, so each case is met
at a known point rather than raced."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from cli import leukoflow_here

from leukoflow.errors import LeukoflowError, StoreUnavailable
from leukoflow.store import pseudonym, registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import S3FS_TRIES, check_store, open_location, write_json_atomic

from .proxy import Request, StoppableEndpoint

pytestmark = pytest.mark.integration

ATTEMPTS = 3  # LEUKOFLOW_S3_MAX_ATTEMPTS in these tests: small, so a spent budget is quick


@pytest.fixture
def endpoint(s3_env, monkeypatch):
    """The proxy in front of moto; this test's S3 clients talk to it."""
    proxy = StoppableEndpoint(s3_env.url.removeprefix("http://"))
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", str(ATTEMPTS))
    monkeypatch.delenv(registry.KEY_ENV, raising=False)
    yield proxy
    proxy.close()


@pytest.fixture
def bucket(s3_env, endpoint) -> str:
    return s3_env.make_bucket("failures")


@pytest.fixture
def store(bucket):
    """The store, reached through the proxy."""
    return open_location(f"s3://{bucket}/store")


@pytest.fixture
def direct(s3_env):
    """moto itself, behind the proxy's back: what the store really holds."""
    fs = s3_env.filesystem()

    def objects(bucket: str) -> dict[str, bytes]:
        fs.invalidate_cache()
        return {path: fs.cat_file(path) for path in fs.find(bucket)}

    return objects


@pytest.fixture(scope="module")
def fitted():
    from leukoflow.learn import calibration, train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    y = (x[:, 0] > 0).astype(int)
    return calibration.fit_calibrated("linear-svm", x, y, train.kfold(y, [None] * 40, n_folds=3))


def record_of(model_id: str) -> ModelRecord:
    return ModelRecord(model_id, classifier="linear-svm", threshold=0.42,
                       score_kind="probability", non_clinical=False)  # fmt: skip


def put_of(name: str):
    """Matches a PUT of an object whose key ends with /name."""
    return lambda r: r.method == "PUT" and r.path.endswith(f"/{name}")


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -- access denied ----------------------------------------------------------------------------
def test_access_denied_is_one_line_naming_the_store_and_nothing_is_written(
    endpoint, bucket, store, direct, fitted, capsys
):
    root = f"s3://{bucket}/store"
    registry.save_model(store, "m-1", fitted, record_of("m-1"))
    registry.promote(store, "m-1")
    before = direct(bucket)
    endpoint.fail_next(1000, status=403, code="AccessDenied")  # credentials revoked

    with pytest.raises(LeukoflowError) as refused:
        check_store(store)  # what run and score do first
    assert (
        one_line(refused.value) == f"access to the store {root} was refused: check the credentials"
    )

    # Mid-run (the credentials expire while it works): the failed call names the object.
    with pytest.raises(StoreUnavailable) as denied:
        registry.save_model(store, "m-2", fitted, record_of("m-2"))
    assert one_line(denied.value) == f"cannot read {root}/models/m-2/model.json: Forbidden"

    # The command line: one line, exit status 2, no traceback.
    result = leukoflow_here(capsys, "models", "promote", "m-1", "--store", root)
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        f"leukoflow: error: access to the store {root} was refused"
    ]
    assert "Traceback" not in result.stdout + result.stderr

    # Credentials that may read but not write: the refused write is not retried (403 is final).
    endpoint.clear_failures()
    answered = endpoint.errors_answered(403)
    endpoint.fail_next(1000, status=403, code="AccessDenied", when=lambda r: r.method == "PUT")
    with pytest.raises(StoreUnavailable) as denied:
        registry.save_model(store, "m-2", fitted, record_of("m-2"))
    assert one_line(denied.value) == (
        f"cannot write {root}/models/m-2/model.skops (retried within the budget): Access Denied"
    )
    assert endpoint.errors_answered(403) - answered == 1
    assert direct(bucket) == before  # not one object added or changed


# -- throttling and server errors: the retry budget ----------------------------------------------
# botocore's standard mode retries 5xx and SlowDown up to LEUKOFLOW_S3_MAX_ATTEMPTS attempts in
# all; s3fs repeats the whole call once more (S3FS_TRIES) when the answer was SlowDown.
BUDGETS = [(503, "SlowDown", S3FS_TRIES * ATTEMPTS), (500, "InternalError", ATTEMPTS)]


@pytest.mark.parametrize(("status", "code", "budget"), BUDGETS, ids=["503-slowdown", "500"])
def test_a_few_throttled_or_failed_requests_are_retried_and_the_save_succeeds(
    endpoint, bucket, store, fitted, status, code, budget
):
    endpoint.fail_next(ATTEMPTS - 1, status=status, code=code, when=put_of("model.skops"))
    endpoint.fail_next(ATTEMPTS - 1, status=status, code=code, when=put_of("model.json"))
    registry.save_model(store, "m-1", fitted, record_of("m-1"))
    assert endpoint.errors_answered(status) == 2 * (ATTEMPTS - 1)
    assert registry.load_record(store, "m-1") == record_of("m-1")  # whole and verified


@pytest.mark.parametrize(("status", "code", "budget"), BUDGETS, ids=["503-slowdown", "500"])
def test_past_the_retry_budget_a_save_fails_in_one_line_and_leaves_no_model(
    endpoint, bucket, store, direct, fitted, status, code, budget
):
    endpoint.fail_next(1000, status=status, code=code, when=put_of("integrity.json"))
    with pytest.raises(StoreUnavailable) as failed:
        registry.save_model(store, "m-1", fitted, record_of("m-1"))
    where = f"s3://{bucket}/store/models/m-1/integrity.json"
    assert one_line(failed.value).startswith(f"cannot write {where} (retried within the budget)")
    # Exactly the budget: LEUKOFLOW_S3_MAX_ATTEMPTS attempts in all per call, not one more.
    assert endpoint.errors_answered(status) == budget
    # The model file landed before the outage, its record never: no model, to every reader.
    names = {path.rsplit("/", 1)[1] for path in direct(bucket)}
    assert names == {"model.skops"}
    assert registry.list_models(store) == []
    with pytest.raises(LeukoflowError, match="no model m-1 in"):
        registry.load_record(store, "m-1")
    endpoint.clear_failures()  # the store recovers: the same save goes through
    registry.save_model(store, "m-1", fitted, record_of("m-1"))
    assert registry.load_record(store, "m-1") == record_of("m-1")


# -- an outage in the middle of a save or a promotion: before or after, never half ---------------
@pytest.mark.parametrize(
    ("name", "applied"),
    [
        ("model.skops", False),
        ("integrity.json", False),
        ("model.json", False),
        ("model.json", True),
    ],  # fmt: skip
    ids=["at-the-model-file", "at-the-digests", "at-the-record", "after-the-record"],
)
def test_an_outage_during_save_leaves_the_model_complete_or_absent(
    endpoint, bucket, store, direct, fitted, monkeypatch, name, applied
):
    monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", "1")  # the endpoint stays away: fail fast
    outage = endpoint.stop_when(put_of(name), after_applied=applied)
    with pytest.raises(StoreUnavailable) as failed:
        registry.save_model(store, "m-1", fitted, record_of("m-1"))
    assert outage.is_set() and not endpoint.listening
    assert one_line(failed.value).startswith(f"cannot write s3://{bucket}/store/models/m-1/{name}")
    assert "Could not connect to the endpoint URL" in str(failed.value)
    written = {path.rsplit("/", 1)[1] for path in direct(bucket)}
    endpoint.start()
    if "model.json" in written:  # its record landed: the model is whole and verifies
        assert applied and written == {"model.skops", "integrity.json", "model.json"}
        assert registry.load_record(store, "m-1") == record_of("m-1")
        with pytest.raises(LeukoflowError, match="already exists"):  # a retry says so
            registry.save_model(store, "m-1", fitted, record_of("m-1"))
    else:  # no record: no model, whatever else landed; the save is simply run again
        assert not applied
        assert registry.list_models(store) == []
        with pytest.raises(LeukoflowError, match="no model m-1 in"):
            registry.load_record(store, "m-1")
        registry.save_model(store, "m-1", fitted, record_of("m-1"))
    model, record = registry.load_model(store, "m-1")
    assert record == record_of("m-1") and model.predict(np.zeros((1, 4))).shape == (1,)


def _pointer(direct, bucket: str) -> bytes:
    return direct(bucket)[f"{bucket}/store/models/CURRENT.json"]


@pytest.mark.parametrize("applied", [False, True], ids=["before-the-swap", "after-the-swap"])
def test_an_outage_during_promote_leaves_the_old_pointer_or_the_new_one(
    endpoint, bucket, store, direct, fitted, monkeypatch, applied
):
    for model_id in ("m-1", "m-2"):
        registry.save_model(store, model_id, fitted, record_of(model_id))
    registry.promote(store, "m-1")
    before = _pointer(direct, bucket)
    monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", "1")
    outage = endpoint.stop_when(put_of("CURRENT.json"), after_applied=applied)
    with pytest.raises(StoreUnavailable) as failed:
        registry.promote(store, "m-2")
    assert outage.is_set()
    assert one_line(failed.value).startswith(f"cannot write s3://{bucket}/store/models/CURRENT")
    after = json.loads(_pointer(direct, bucket))  # whole JSON either way
    endpoint.start()
    if applied:
        assert (after["model_id"], after["previous"]) == ("m-2", "m-1")
        assert registry.current_model_id(store) == "m-2"
    else:
        assert _pointer(direct, bucket) == before
        assert registry.current_model_id(store) == "m-1"
        assert registry.promote(store, "m-2")["previous"] == "m-1"  # run again, it goes through
    assert registry.current_model_id(store) == "m-2"


@pytest.mark.parametrize("previous", [None, "m-1"], ids=["first-promotion", "replacing"])
def test_a_promotion_whose_answer_was_lost_and_retried_reports_success(
    endpoint, bucket, store, direct, fitted, previous
):
    """The swap lands, the connection drops before the answer, botocore sends it again: the
    retry's condition (If-Match, or If-None-Match for the first pointer) no longer holds, the
    pointer being already ours. The promotion happened, and must say so, not blame another
    promotion."""
    for model_id in ("m-1", "m-2"):
        registry.save_model(store, model_id, fitted, record_of(model_id))
    if previous:
        registry.promote(store, previous)
    cut = endpoint.cut_when(put_of("CURRENT.json"))
    pointer = registry.promote(store, "m-2")
    assert cut.is_set() and endpoint.listening
    swaps = [r for r in endpoint.requests if put_of("CURRENT.json")(r)]
    assert len(swaps) - (1 if previous else 0) >= 2  # applied and unanswered, then the retry
    assert (pointer["model_id"], pointer["previous"]) == ("m-2", previous)
    assert json.loads(_pointer(direct, bucket)) == pointer
    assert registry.current_model_id(store) == "m-2"


# -- races on S3 -------------------------------------------------------------------------------
def _race(n: int, work) -> dict[int, object]:
    """Run work(i) in n threads at once; {i: its result or the exception it raised}."""
    start, results = threading.Barrier(n), {}

    def run(i: int) -> None:
        start.wait(timeout=60)
        try:
            results[i] = work(i)
        except Exception as error:  # noqa: BLE001 (each racer's outcome is the point)
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_racing_promotions_on_s3_have_exactly_one_winner(
    endpoint, bucket, store, direct, fitted, monkeypatch
):
    contenders = [f"m-{n}" for n in range(1, 5)]
    for model_id in ["m-0", *contenders]:
        registry.save_model(store, model_id, fitted, record_of(model_id))
    registry.promote(store, "m-0")
    # Every contender has read the same pointer before any of them writes: the swaps really
    # race on S3's If-Match, not on who happened to read first.
    all_read = threading.Barrier(len(contenders))
    real_read, waited = registry.read_versioned, set()

    def read_then_wait(loc):
        seen = real_read(loc)
        if threading.get_ident() not in waited:  # its first read (a loser reads once more)
            waited.add(threading.get_ident())
            all_read.wait(timeout=60)
        return seen

    monkeypatch.setattr(registry, "read_versioned", read_then_wait)
    stores = [open_location(f"s3://{bucket}/store") for _ in contenders]  # a client each
    outcome = _race(len(contenders), lambda i: registry.promote(stores[i], contenders[i]))
    winners = [contenders[i] for i, result in outcome.items() if isinstance(result, dict)]
    assert len(winners) == 1, outcome
    for i, result in outcome.items():
        if contenders[i] != winners[0]:
            assert isinstance(result, LeukoflowError), result
            assert "another promotion changed the current model" in str(result)
    pointer = json.loads(_pointer(direct, bucket))
    assert (pointer["model_id"], pointer["previous"]) == (winners[0], "m-0")
    monkeypatch.setattr(registry, "read_versioned", real_read)
    assert registry.current_model_id(store) == winners[0]


def test_racing_first_uses_of_the_subject_salt_on_s3_get_one_salt(
    endpoint, bucket, direct, monkeypatch
):
    racers = 4
    all_looked = threading.Barrier(racers)
    real_exists, real_create = pseudonym.exists, pseudonym.create_if_absent
    created = []

    def exists_then_wait(loc):
        found = real_exists(loc)
        all_looked.wait(timeout=60)  # every racer saw no salt before any writes one
        return found

    def create(loc, data):
        won = real_create(loc, data)
        created.append(won)
        return won

    monkeypatch.setattr(pseudonym, "exists", exists_then_wait)
    monkeypatch.setattr(pseudonym, "create_if_absent", create)
    stores = [open_location(f"s3://{bucket}/store") for _ in range(racers)]
    outcome = _race(racers, lambda i: pseudonym.subject_salt(stores[i]))
    assert sorted(created) == [False] * (racers - 1) + [True]  # one writer, on S3's If-None-Match
    salts = set(outcome.values())
    assert len(salts) == 1, outcome
    (salt,) = salts
    assert isinstance(salt, bytes) and len(salt) == 32
    assert direct(bucket)[f"{bucket}/store/keys/subject-salt"].decode().strip() == salt.hex()


# -- the proxy itself ----------------------------------------------------------------------------
def test_the_stopped_endpoint_refuses_connections_and_keeps_its_port(endpoint, bucket, store):
    import socket

    write_json_atomic(store.child("a.json"), {"n": 1})
    endpoint.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
    squatter = socket.socket()
    with pytest.raises(OSError, match="in use"):  # nobody else can take the port meanwhile
        squatter.bind(("127.0.0.1", endpoint.port))
    squatter.close()
    endpoint.start()
    write_json_atomic(store.child("a.json"), {"n": 2})
    assert [r.method for r in endpoint.requests if r.path.endswith("/a.json")] == ["PUT", "PUT"]
    assert isinstance(endpoint.requests[0], Request)


# -- an outage during the nightly sweep ----------------------------------------------------------
def test_an_outage_during_score_fails_in_one_line_and_keeps_the_chunks_written_whole(
    endpoint, bucket, direct, tmp_path, monkeypatch, ray_local, prefect_harness
):
    """A model trained into an s3:// store, then a sweep of 12 new cells in chunks of 4; the
    endpoint goes away as the second chunk's predictions are sent, and stays away: the sweep
    fails naming the store, and the store holds the first chunk, whole, and nothing else of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from leukoflow.features.synthetic import make_synthetic_dataset
    from leukoflow.flows.run import run_pipeline
    from leukoflow.flows.score import score_inbox
    from leukoflow.recipe import FeatureRecipe
    from leukoflow.scoring.score import SweepSettings
    from leukoflow.store.tables import scored_image_ids

    root = f"s3://{bucket}/store"
    train = make_synthetic_dataset(tmp_path / "train", n_subjects=6, cells_per_subject=4,
                                   image_side=64, seed=0)  # fmt: skip
    trained = run_pipeline(
        images=str(train), store=root, examples_per_kind=0,
        recipe=FeatureRecipe(("vgg16",), weights="none", image_size=32),
    )  # fmt: skip
    source = make_synthetic_dataset(tmp_path / "night", n_subjects=4, cells_per_subject=3,
                                    image_side=64, seed=1)  # fmt: skip
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for cell in sorted(source.rglob("*.bmp")):
        (inbox / cell.name).write_bytes(cell.read_bytes())  # unlabelled, as in an inbox

    chunks_sent: list[str] = []

    def second_chunk(request: Request) -> bool:
        if request.method == "PUT" and "/predictions/" in request.path:
            chunks_sent.append(request.path)
        return len(chunks_sent) == 2

    outage = endpoint.stop_when(second_chunk)
    monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", "1")  # it stays away: fail fast
    settings = SweepSettings(chunk_size=4, min_flagged_cells=2, min_flagged_fraction=0.5)
    with pytest.raises(StoreUnavailable) as failed:
        score_inbox(inbox=str(inbox), store=root, date="2026-03-01", sweep=settings)
    assert outage.is_set() and len(chunks_sent) == 2
    assert one_line(failed.value).startswith(f"cannot write {root}/")
    assert "Could not connect to the endpoint URL" in str(failed.value)
    # Behind the proxy's back: every object whole; of the night's predictions, the first chunk.
    held = direct(bucket)
    for path, data in held.items():
        if path.endswith(".parquet"):
            pq.read_table(pa.BufferReader(data))
        elif path.endswith(".json"):
            json.loads(data)
    parts = [path for path in held if "/predictions/" in path]
    assert len(parts) == 1 and parts[0].endswith(chunks_sent[0].rsplit("/", 1)[1])
    first = pq.read_table(pa.BufferReader(held[parts[0]]))
    assert first.num_rows == 4 and len(set(first.column("image_id").to_pylist())) == 4
    endpoint.start()
    store = open_location(root)
    assert scored_image_ids(store, trained["model_id"]) == set(first.column("image_id").to_pylist())
