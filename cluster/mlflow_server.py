"""How an `mlflow server` is started: its arguments, its environment and its login config.

One builder for `chestxpert up`, the central-server test and cluster/compose.yaml (checked
against it by tests/test_deploy_compose.py), so the three cannot drift apart.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from chestxpert.cluster.processes import spawn_service, wait_until

# The compose image's auth config: MLflow's own defaults, the user store on a volume.
AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"
# What a login may do where it was given no permission: read (MLflow's default).
DEFAULT_PERMISSION = "READ"


@dataclass(frozen=True)
class BasicAuth:
    """`--app-name basic-auth`: its config file (`basic_auth_ini`), the admin MLflow creates on
    the first start against an empty user store, and the key that signs its login forms."""

    config_path: str
    admin_username: str
    admin_password: str
    flask_secret_key: str


@dataclass(frozen=True)
class S3Artifacts:
    """The S3-compatible endpoint the server stores proxied artifacts in, and its key pair.

    Keys left None come from the server's own AWS chain (instance profile, ~/.aws).
    """

    endpoint_url: str
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class MlflowServerConfig:
    """Everything an `mlflow server` is started with. Secrets (the store URI's password, the
    admin password, S3 keys) go only into the environment, never onto the command line."""

    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    workers: int = 2
    job_runner: bool = False
    auth: BasicAuth | None = None
    s3: S3Artifacts | None = None
    allowed_hosts: str | None = None


def server_args(config: MlflowServerConfig) -> list[str]:
    """The arguments after `mlflow` (`server --host …`), in the order compose.yaml lists them.

    Artifacts are proxied (`--serve-artifacts`): clients reach them through the server and
    need no storage credentials of their own.
    """
    args = ["server", "--host", config.host, "--port", str(config.port)]
    args += ["--workers", str(config.workers)]
    if config.auth is not None:
        args += ["--app-name", "basic-auth"]
    return args + ["--serve-artifacts", "--artifacts-destination", config.artifacts_destination]


def server_environment(config: MlflowServerConfig) -> dict[str, str]:
    """The variables the server reads, besides its arguments.

    The store URI travels as MLFLOW_BACKEND_STORE_URI (it may hold the database password, which
    the process list would show); the job runner is off unless asked for (seven processes and
    1.85 GB that ChestXpert never uses).
    """
    env = {
        "MLFLOW_BACKEND_STORE_URI": config.backend_store_uri,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if config.job_runner else "false",
    }
    if config.s3 is not None:
        env["MLFLOW_S3_ENDPOINT_URL"] = config.s3.endpoint_url
        env["AWS_ENDPOINT_URL_S3"] = config.s3.endpoint_url
        if config.s3.access_key_id and config.s3.secret_access_key:
            env["AWS_ACCESS_KEY_ID"] = config.s3.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = config.s3.secret_access_key
        if config.s3.region:
            env["AWS_DEFAULT_REGION"] = config.s3.region
    if config.auth is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = config.auth.config_path
        env["MLFLOW_AUTH_ADMIN_USERNAME"] = config.auth.admin_username
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = config.auth.admin_password
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = config.auth.flask_secret_key
    if config.allowed_hosts is not None:
        env["MLFLOW_SERVER_ALLOWED_HOSTS"] = config.allowed_hosts
    return env


def basic_auth_ini(user_store_uri: str, admin_username: str) -> str:
    """The text of basic-auth's config file (MLFLOW_AUTH_CONFIG_PATH) with its users in
    `user_store_uri`. It holds no password: the admin's comes from MLFLOW_AUTH_ADMIN_PASSWORD."""
    return (
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {user_store_uri}\n"
        f"admin_username = {admin_username}\n"
        f"authorization_function = {AUTH_FUNCTION}\n"
    )


def write_basic_auth_ini(path: Path, user_store_uri: str, admin_username: str) -> Path:
    """Write `basic_auth_ini` to `path` (under a temporary name, then renamed); return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(basic_auth_ini(user_store_uri, admin_username))
    os.replace(partial, path)
    return path


def postgres_store_uri(user: str, password: str, host: str, port: int, database: str) -> str:
    """MLflow's store URI for a PostgreSQL database (psycopg2 driver), the login URL-quoted so
    that a password holding `@`, `/` or `:` still parses. Keep it out of logs: it holds the
    password."""
    login = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return f"postgresql+psycopg2://{login}@{host}:{port}/{quote(database, safe='')}"


def start_mlflow_server(
    config: MlflowServerConfig,
    log_path: Path,
    timeout_s: float = 90.0,
    on_spawn: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start `mlflow server` with `config` in its own session; wait until `/health` answers.

    Returns its record (pid, start time, log, url). `on_spawn` gets the record as soon as the
    process exists, so a caller killed while waiting has recorded what to stop. `/health`
    answers without a login, also under basic-auth.
    """
    url = f"http://{config.host}:{config.port}"
    cmd = [sys.executable, "-m", "mlflow", *server_args(config)]
    proc, record = spawn_service(
        cmd, log_path, env=server_environment(config), on_spawn=on_spawn, url=url
    )

    def healthy() -> bool:
        return requests.get(f"{url}/health", timeout=2).status_code == 200

    wait_until("MLflow server", healthy, proc.pid, log_path, timeout_s)
    return record
