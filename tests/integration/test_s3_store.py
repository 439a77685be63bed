"""A store and images on S3 (moto's real server on 127.0.0.1), through the command line.

The CLI runs as a user would run it: credentials and endpoint only in the standard AWS
environment variables, its own $TMPDIR (where Ray keeps its session logs), flow runs reported to
the test's Prefect server (whose database keeps their parameters and logs). So the test can prove
that every object went to the bucket and that the credentials were written nowhere.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from servers import last_json_line, run_cli, server_env

from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog, read_predictions, read_runs

pytestmark = pytest.mark.integration

N_IMAGES = 8
STORE_FILES = ("model.json", "metrics.json", "report.md", "report.html", "CURRENT.json")


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, prefect_server, tmp_path_factory):
    """`run` on s3://.../images, `score` of s3://.../inbox, `status`: all into s3://.../store."""
    bucket = s3_endpoint.make_bucket()
    local = tmp_path_factory.mktemp("s3-images")
    images = make_synthetic_dataset(local, n_subjects=4, cells_per_subject=2, image_side=48)
    s3 = s3_endpoint.filesystem()
    s3.put(str(images), f"{bucket}/images", recursive=True)
    # The inbox holds the same cells unlabelled: scoring reuses their stored vectors.
    s3.put(str(images / "fold_0" / "all"), f"{bucket}/inbox", recursive=True)
    s3.put(str(images / "fold_0" / "hem"), f"{bucket}/inbox", recursive=True)
    shutil.rmtree(images)  # the commands can only read the bucket
    # Short path: Ray puts its Unix sockets under $TMPDIR.
    scratch = Path(tempfile.mkdtemp(prefix="lf-s3-", dir="/tmp"))
    dirs = {"cwd": scratch / "cwd", "tmp": scratch / "tmp", "prefect": prefect_server.home}
    dirs["cwd"].mkdir()
    dirs["tmp"].mkdir()
    env = server_env(TMPDIR=str(dirs["tmp"]), **prefect_server.env, **s3_endpoint.env)
    store = f"s3://{bucket}/store"
    commands = {
        "run": [
            "run", f"s3://{bucket}/images", "--store", store, "--backbones", "vgg16",
            "--image-size", "32", "--weights", "none", "--json",
        ],
        "score": ["score", f"s3://{bucket}/inbox", "--store", store, "--json"],
        "status": ["status", "--store", store, "--json"],
    }  # fmt: skip
    try:
        results = {}
        for name, args in commands.items():
            results[name] = run_cli(args, env=env, cwd=dirs["cwd"])
            assert results[name].returncode == 0, results[name].stderr[-4000:]
        yield {
            "bucket": bucket,
            "store": store,
            **{name: last_json_line(result.stdout) for name, result in results.items()},
            "outputs": [text for r in results.values() for text in (r.stdout, r.stderr)],
            "local": dirs,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_every_table_model_and_report_is_in_the_bucket(s3_endpoint, s3_run):
    summary, bucket = s3_run["run"], s3_run["bucket"]
    objects = set(s3_endpoint.filesystem().find(f"{bucket}/store"))
    model = f"{bucket}/store/models/{summary['model_id']}"
    expected = {
        f"{bucket}/store/catalog/dataset=default/catalog.parquet",
        f"{model}/model.skops",
        f"{model}/model.json",
        f"{model}/metrics.json",
        f"{model}/report.md",
        f"{model}/report.html",
        f"{bucket}/store/models/CURRENT.json",
        f"{bucket}/store/runs/run-{summary['run_id']}.parquet",
        f"{bucket}/store/runs/run-{s3_run['score']['run_id']}.parquet",
    }
    assert expected <= objects
    assert any(o.startswith(f"{bucket}/store/features/backbone=vgg16/") for o in objects)
    night = f"{bucket}/store/predictions/date={s3_run['score']['date']}/"
    assert any(o.startswith(night) and o.endswith(".parquet") for o in objects)
    assert not [o for o in objects if o.rsplit("/", 1)[-1].startswith((".", "_"))]
    assert all(path.startswith(f"s3://{bucket}/store/") for path in summary["paths"].values())


def test_the_tables_read_back_from_s3(s3_env, s3_run):
    store = open_location(s3_run["store"])
    catalog = read_catalog(store, "default")
    assert catalog.num_rows == N_IMAGES
    assert all(
        uri.startswith(f"s3://{s3_run['bucket']}/images/") for uri in catalog["uri"].to_pylist()
    )
    runs = read_runs(store)
    assert sorted(runs.column("kind").to_pylist()) == ["run", "score"]
    assert set(runs.column("outcome").to_pylist()) == {"completed"}
    assert s3_run["status"]["store"] == s3_run["store"]
    assert s3_run["status"]["features"] == {"vgg16": {"random-seed0@32px": N_IMAGES}}
    assert s3_run["status"]["current_model"] == s3_run["run"]["model_id"]
    predictions = read_predictions(store)
    assert predictions.num_rows == N_IMAGES
    assert set(predictions.column("model_id").to_pylist()) == {s3_run["run"]["model_id"]}
    assert all(
        u.startswith(f"s3://{s3_run['bucket']}/inbox/") for u in predictions["uri"].to_pylist()
    )


def test_nothing_is_left_in_local_folders(s3_run):
    """No table, model or report in the working folder, $TMPDIR or Prefect's home."""
    leftovers = [
        path
        for folder in s3_run["local"].values()
        for path in folder.rglob("*")
        if path.is_file() and (path.suffix in (".parquet", ".skops") or path.name in STORE_FILES)
    ]
    assert not leftovers


def test_credentials_appear_in_no_output_log_or_object(s3_endpoint, s3_run):
    secrets = [s3_endpoint.env["AWS_SECRET_ACCESS_KEY"], s3_endpoint.env["AWS_ACCESS_KEY_ID"]]
    texts = {f"output {i}": text.encode() for i, text in enumerate(s3_run["outputs"])}
    s3 = s3_endpoint.filesystem()
    for key in s3.find(s3_run["bucket"]):
        texts[f"s3://{key}"] = s3.cat_file(key)
    # Ray's session logs (under $TMPDIR), Prefect's database and logs (under PREFECT_HOME).
    for folder in s3_run["local"].values():
        for path in folder.rglob("*"):
            if path.is_file():
                texts[str(path)] = path.read_bytes()
    assert len(texts) > 20  # the scan saw the bucket and the local logs, not just stdout
    leaks = [where for where, data in texts.items() for s in secrets if s.encode() in data]
    assert not leaks
