"""cluster/compose.yaml and its .env.example: loopback ports, every secret from the env file,
MLflow with basic auth over Postgres and MinIO, health checks, and `docker compose config`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.version import Version

from tests.conftest import REPO
from tests.deploy_helpers import (
    COMPOSE,
    ENV_EXAMPLE,
    SECRET_NAME,
    pyproject_requirement,
)

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation of `value` with the variables in `env`.

    Forms: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$.
    """

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise KeyError(f"{name}: {arg}")
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        return value or ""

    return _VARIABLE.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def env_example() -> dict[str, str]:
    pairs = [
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return {key.strip(): value.strip() for key, value in pairs}


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_strings(value)
    elif isinstance(node, str):
        yield node


def test_compose_has_the_four_services() -> None:
    services = load_compose()["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "mlflow"}
    assert services["postgres"]["image"].startswith("postgres:16")


@pytest.mark.parametrize("env", [{}, env_example()], ids=["unset", ".env.example"])
def test_every_published_port_is_on_loopback_by_default(env: dict[str, str]) -> None:
    published = []
    for name, service in load_compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as HOST_IP:HOST_PORT:CONTAINER_PORT"
            parts = interpolate(port, env).split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", (
                f"{name} publishes {port} beyond loopback"
            )
            published.append((name, int(parts[2])))
    assert ("mlflow", 5000) in published
    assert "ports" not in load_compose()["services"]["postgres"]


def test_compose_reads_every_secret_from_the_env_file() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), (
                    f"{name}.{key} must be ${{VAR:?…}}"
                )
    for text in walk_strings(load_compose()):
        for userinfo in re.findall(r"//([^@/\s]*)@", text):
            assert re.fullmatch(r"(?:\$\{[^}]+\}|:)+", userinfo), f"a literal login in {text!r}"
        bare = _VARIABLE.sub("", text)
        assert not re.search(r"(?i)password\s*[:=]\s*\S", bare), f"a literal password in {text!r}"


def test_every_compose_variable_is_in_env_example_with_placeholders() -> None:
    text, example = COMPOSE.read_text().replace("$$", ""), env_example()
    referenced = {m["name"]: m["op"] for m in _VARIABLE.finditer(text)}
    missing = sorted(set(referenced) - set(example))
    assert missing == [], f"cluster/.env.example does not document {missing}"
    for name, op in referenced.items():
        if op == ":?":
            assert example[name], f"{name} is required by compose.yaml but empty in .env.example"
        if "PASSWORD" in name or "SECRET" in name:
            assert "change-me" in example[name], f"{name} in .env.example must be a placeholder"
    # The servers refuse shorter ones: MLflow passwords need 12 characters, MinIO's 8.
    assert len(example["MLFLOW_ADMIN_PASSWORD"]) >= 12
    assert (
        len(example["MINIO_ROOT_PASSWORD"]) >= 8 and len(example["CHESTXPERT_S3_SECRET_KEY"]) >= 8
    )


def test_mlflow_runs_with_basic_auth_a_postgres_store_and_minio_artifacts() -> None:
    services = load_compose()["services"]
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    destination = urlparse(command[command.index("--artifacts-destination") + 1])
    env = {key: interpolate(value, env_example()) for key, value in environment(mlflow).items()}
    store = urlparse(env["MLFLOW_BACKEND_STORE_URI"])
    assert (
        store.scheme.startswith("postgresql")
        and store.hostname == "postgres"
        and store.port == 5432
    )
    assert store.path == "/" + env_example()["POSTGRES_DB"]
    assert urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == env_example()["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    # The bucket MLflow writes to is the one minio-init creates.
    init = " ".join(services["minio-init"]["command"])
    assert (
        destination.scheme == "s3" and f"mc mb --ignore-existing local/{destination.netloc}" in init
    )
    assert mlflow["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }
    # The server is the clients' MLflow minor version.
    # With the `auth` extra: --app-name basic-auth refuses to start without Flask-WTF.
    install = re.search(r"mlflow\[([^\]]*)\]==([0-9.]+)", mlflow["build"]["dockerfile_inline"])
    assert install and "auth" in install.group(1).split(","), "install mlflow[auth]==X.Y.Z"
    pinned = Version(install.group(2))
    assert pinned in pyproject_requirement("mlflow").specifier
    assert pinned.release[:2] == Version(importlib.metadata.version("mlflow")).release[:2]
    assert "USER mlflow" in mlflow["build"]["dockerfile_inline"]


def test_mlflow_auth_config_is_read_by_mlflow_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # config.py by itself: the package would import the auth app, which needs Flask-WTF,
    # an extra the server image installs and this virtualenv does not.
    import mlflow

    source = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    module_spec = importlib.util.spec_from_file_location("mlflow_auth_config", source)
    assert module_spec and module_spec.loader
    auth_config = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(auth_config)

    mlflow = load_compose()["services"]["mlflow"]
    written = re.search(r"printf '([^']*)' > (\S+)", mlflow["build"]["dockerfile_inline"])
    assert written and written.group(2) == environment(mlflow)["MLFLOW_AUTH_CONFIG_PATH"]
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(written.group(1).replace("\\n", "\n"))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", env_example()["MLFLOW_ADMIN_PASSWORD"])
    config = auth_config.read_auth_config()
    # The user store lives on the mlflow-auth volume, the admin password comes from the env file.
    store = Path(config.database_uri.removeprefix("sqlite:///"))
    mounts = dict(volume.split(":", 1) for volume in mlflow["volumes"])
    assert str(store.parent) == mounts["mlflow-auth"]
    assert config.admin_password == env_example()["MLFLOW_ADMIN_PASSWORD"]
    assert config.authorization_function.endswith("authenticate_request_basic_auth")


def test_every_long_running_service_has_a_health_check() -> None:
    for name, service in load_compose()["services"].items():
        if service.get("restart") == "no":
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"


def test_git_ignores_the_env_file_but_not_its_example() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git work tree")
    ignored = subprocess.run(["git", "check-ignore", "-q", "cluster/.env"], cwd=REPO)
    example = subprocess.run(["git", "check-ignore", "-q", "cluster/.env.example"], cwd=REPO)
    assert (ignored.returncode, example.returncode) == (0, 1)


def test_docker_compose_accepts_the_file_with_the_example_env() -> None:
    docker = shutil.which("docker")
    probe = docker and subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True
    )
    if not probe or probe.returncode != 0:
        pytest.skip(
            "`docker compose` is not installed here; the file is checked by the tests above only"
        )
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_mlflow_as_the_tested_central_server_does() -> None:
    """tests/test_central_mlflow.py runs the server `cluster.mlflow_server` builds; compose.yaml
    must start the same one: same arguments, same variables, same auth config."""
    from chestxpert.cluster.mlflow_server import (
        BasicAuth,
        MlflowServerConfig,
        S3Artifacts,
        basic_auth_ini,
        server_args,
        server_environment,
    )

    mlflow = load_compose()["services"]["mlflow"]
    env = environment(mlflow)
    config = MlflowServerConfig(
        host="0.0.0.0",
        port=5000,
        backend_store_uri=env["MLFLOW_BACKEND_STORE_URI"],
        artifacts_destination="s3://chestxpert/mlflow",
        auth=BasicAuth(env["MLFLOW_AUTH_CONFIG_PATH"], "admin", "x", "y"),
        s3=S3Artifacts("http://minio:9000", "key", "secret", "us-east-1"),
        allowed_hosts="",
    )
    assert mlflow["command"] == ["mlflow", *server_args(config)]
    # AWS_ENDPOINT_URL_S3 is boto3's newer spelling of the endpoint; compose gives the older one.
    assert set(env) == set(server_environment(config)) - {"AWS_ENDPOINT_URL_S3"}
    written = re.search(r"printf '([^']*)' > (\S+)", mlflow["build"]["dockerfile_inline"])
    assert written, "compose's mlflow image no longer writes basic_auth.ini"
    ini = written.group(1).replace("\\n", "\n")
    assert ini == basic_auth_ini("sqlite:////var/lib/mlflow-auth/basic_auth.db", "admin")
