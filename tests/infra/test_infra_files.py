"""infra/ and deployments/: each file is valid for its tool, and the pieces agree with each other
and with the code (image names, ports, pool name, environment variables, versions)."""

from __future__ import annotations

import copy
import inspect
import os
import re
import subprocess
import sys
import tomllib
from importlib import import_module
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from leukoflow.deploy import DEPLOYMENTS, WORK_POOL, placeholder_values

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE, GPU_IMAGE = f"leukoflow:{VERSION}", f"leukoflow:{VERSION}-gpu"


def pinned(package: str) -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, _, pin = requirement.partition("==")
        if name.split("[")[0] == package:
            return pin
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# -- Dockerfile ------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies kept whole."""
    lines = (INFRA / "Dockerfile").read_text().splitlines()
    instructions, current, heredoc = [], "", None
    for line in lines:
        if heredoc is not None:
            current += "\n" + line
            if line.strip() == heredoc:
                instructions.append(current)
                current, heredoc = "", None
            continue
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current = f"{current} {line.strip()}" if current else line.strip()
        marker = re.search(r"<<'?(\w+)'?$", current)
        if marker:
            heredoc = marker.group(1)
        elif current.endswith("\\"):
            current = current[:-1]
        else:
            instructions.append(current)
            current = ""
    assert not current and heredoc is None, "unterminated instruction"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in instructions]


KNOWN_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD"}


def test_the_dockerfile_uses_known_instructions_and_the_pinned_versions():
    instructions = dockerfile_instructions()
    assert {name for name, _ in instructions} <= KNOWN_INSTRUCTIONS
    args = dict(a.split("=", 1) for n, a in instructions if n == "ARG" and "=" in a)
    assert args["PYTHON_VERSION"] == "3.11"  # inside requires-python
    assert args["TENSORFLOW_VERSION"] == pinned("tensorflow-cpu")
    assert [a for n, a in instructions if n == "FROM"] == ["python:${PYTHON_VERSION}-slim"]
    env = " ".join(a for n, a in instructions if n == "ENV")
    for setting in ("LEUKOFLOW_PROJECT_DIR=/opt/leukoflow", "KERAS_HOME=/opt/keras",
                    "RAY_AUTH_MODE=token"):  # fmt: skip
        assert setting in env
    assert (
        'CMD ["prefect", "worker", "start", "--pool", "leukoflow"]'
        in (INFRA / "Dockerfile").read_text()
    )


def test_the_image_holds_the_project_and_the_weights_folder():
    copies = [a.split() for n, a in dockerfile_instructions() if n == "COPY"]
    sources = {src.rstrip("/") for *srcs, _ in copies for src in srcs}
    # The package's folders (leukoflow/, and tasks/, flows/ mapped into it), not the dev tools.
    packages = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert packages | {"pyproject.toml", "README.md", "deployments", "infra/weights"} <= sources
    assert "bench" not in sources
    assert ["infra/weights/", "${KERAS_HOME}/models/"] in copies
    for source in sources:
        assert (ROOT / source).exists(), source
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for source in sources:  # the build context excludes all but what is copied
        assert f"!{source}/" in ignore or f"!{source}" in ignore, source


def test_the_build_time_weights_check_refuses_a_damaged_file(tmp_path):
    script = next(a for n, a in dockerfile_instructions() if n == "RUN" and "<<'PY'" in a)
    body = script.split("\n", 1)[1].rsplit("\n", 1)[0]
    models = tmp_path / "models"
    models.mkdir()
    env = {**os.environ, "KERAS_HOME": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr  # no weights baked in: a --weights none image
    (models / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"not weights")
    bad = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "6d6bbae143d832006294945121d1f1fc" in bad.stderr


# -- docker-compose.yml ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    return load_yaml(INFRA / "docker-compose.yml")


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else command


def option(command: list[str], name: str) -> str:
    for k, part in enumerate(command):
        if part == name:
            return command[k + 1]
        if part.startswith(f"{name}="):
            return part.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def test_compose_has_the_single_host_services_on_the_project_image(compose):
    services = compose["services"]
    assert {
        "postgres",
        "prefect-server",
        "prefect-worker",
        "minio",
        "ray-head",
        "ray-worker",
    } <= set(services)
    for name in ("prefect-server", "prefect-worker", "ray-head", "ray-worker"):
        assert services[name]["image"] == IMAGE, name


def test_compose_publishes_ports_on_loopback_only(compose):
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published
    assert all(str(p).startswith("127.0.0.1:") for p in published), published


def test_compose_wires_worker_server_ray_and_minio_together(compose):
    services = compose["services"]
    worker_env = services["prefect-worker"]["environment"]
    server = services["prefect-server"]
    port = option(command_of(server), "--port")
    assert worker_env["PREFECT_API_URL"] == f"http://prefect-server:{port}/api"
    assert option(command_of(services["prefect-worker"]), "--pool") == WORK_POOL
    # API authentication: the worker sends what the server requires.
    server_auth = server["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert re.fullmatch(r"\$\{PREFECT_AUTH_STRING(:\?.*)?\}", server_auth)
    assert worker_env["PREFECT_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
    assert "@postgres:5432/" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    head = command_of(services["ray-head"])
    head_port, client_port = option(head, "--port"), option(head, "--ray-client-server-port")
    # The worker's container is no Ray node: its flow runs are Ray Client drivers.
    assert worker_env["RAY_ADDRESS"] == f"ray://ray-head:{client_port}"
    assert option(command_of(services["ray-worker"]), "--address") == f"ray-head:{head_port}"
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token", name
        assert "RAY_AUTH_TOKEN" in services[name]["environment"], name
    deploy = services["deploy"]
    assert deploy["environment"]["PREFECT_API_URL"] == worker_env["PREFECT_API_URL"]
    assert deploy["environment"]["PREFECT_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
    assert command_of(deploy)[:2] == ["leukoflow", "deploy"]
    assert option(command_of(deploy), "--store").startswith("s3://leukoflow/")
    assert worker_env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "127.0.0.1:9000:9000" in services["minio"]["ports"]


def test_every_compose_variable_is_in_env_example():
    text = (INFRA / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    example = (INFRA / ".env.example").read_text().splitlines()
    defined = {
        line.split("=", 1)[0] for line in example if "=" in line and not line.startswith("#")
    }
    assert used and used <= defined, used - defined
    assert ".env" in (INFRA / ".gitignore").read_text().split()


# -- KubeRay RayCluster ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def raycluster():
    [document] = list(yaml.safe_load_all((INFRA / "k8s" / "raycluster.yaml").read_text()))
    return document


def test_the_raycluster_matches_the_installed_ray_and_has_token_auth(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    assert raycluster["spec"]["rayVersion"] == version("ray") == pinned("ray")
    assert raycluster["spec"]["authOptions"]["mode"] == "token"


def test_the_raycluster_has_a_cpu_head_and_a_gpu_worker_group(raycluster):
    head = raycluster["spec"]["headGroupSpec"]
    [head_container] = head["template"]["spec"]["containers"]
    assert head_container["image"] == IMAGE
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # actors go to the workers
    assert head["rayStartParams"].get("dashboard-host", "127.0.0.1") != "0.0.0.0"
    assert {6379, 10001} <= {p["containerPort"] for p in head_container["ports"]}  # GCS, client
    gpu_groups = []
    for group in raycluster["spec"]["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if gpus:
            assert container["image"] == GPU_IMAGE
            assert group["rayStartParams"]["num-gpus"] == str(gpus)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            gpu_groups.append(group["groupName"])
    assert gpu_groups


# -- `ray up` cluster config -----------------------------------------------------------------
def test_the_ray_up_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(INFRA / "ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on an invalid config
    assert config["docker"]["image"] == GPU_IMAGE
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"].startswith("infra/secrets/")
    head_start = " ".join(config["head_start_ray_commands"])
    for flag in ("--port=6379", "--ray-client-server-port=10001", "--dashboard-host=127.0.0.1"):
        assert flag in head_start
    assert ":6379" in " ".join(config["worker_start_ray_commands"])
    assert "secrets/" in (INFRA / ".gitignore").read_text().split()


# -- deployments/prefect.yaml ----------------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_yaml():
    return load_yaml(ROOT / "deployments" / "prefect.yaml")


def test_prefect_yaml_defines_the_three_deployments_on_the_pool(prefect_yaml):
    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    assert prefect_yaml["prefect-version"] == pinned("prefect")
    for deployment in deployments.values():
        assert deployment["work_pool"]["name"] == WORK_POOL
    [schedule] = deployments["nightly"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and "timezone" in schedule
    assert "schedules" not in deployments["backfill"] and "schedules" not in deployments["train"]


def test_each_entrypoint_is_the_flow_its_parameters_fit(prefect_yaml):
    for deployment in prefect_yaml["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file(), path
        flow = getattr(import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert flow.name == DEPLOYMENTS[deployment["name"]]
        accepted = inspect.signature(flow.fn).parameters
        assert set(deployment.get("parameters", {})) <= set(accepted), deployment["name"]
    nightly = next(d for d in prefect_yaml["deployments"] if d["name"] == "nightly")
    assert set(nightly["parameters"]) == {"inbox", "store"}


def strings_in(node) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings_in(value)]
    return [node] if isinstance(node, str) else []


def test_every_placeholder_is_filled_by_leukoflow_deploy(prefect_yaml):
    used = {
        name
        for text in strings_in(prefect_yaml)
        for name in re.findall(r"\{\{\s*\$(\w+)\s*\}\}", text)
    }
    filled = placeholder_values("s3://b/store", "s3://b/inbox", "Europe/Berlin", ROOT)
    assert used == set(filled)


# -- README ----------------------------------------------------------------------------------
def test_the_readme_walks_through_every_piece():
    readme = (ROOT / "README.md").read_text()
    assert "## Scaling out" in readme
    section = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    for piece in (
        "--ray-address", "RAY_AUTH_MODE=token", "--gpu-share", "s3://", "AWS_ENDPOINT_URL",
        "leukoflow deploy", "prefect worker start --pool leukoflow", "PREFECT_API_AUTH_STRING",
        "infra/Dockerfile", "infra/docker-compose.yml", "infra/k8s/raycluster.yaml",
        "infra/ray-cluster.yaml", "deployments/prefect.yaml",
    ):  # fmt: skip
        assert piece in section, piece
