"""The one place that says where the services are: Ray, MLflow and object storage.

Each endpoint is resolved in the same order everywhere: CLI flag (or spec key),
environment variable, the workspace state written by `chestxpert up`, default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from chestxpert.cluster.errors import UserError
from chestxpert.cluster.workspace import read_state, workspace_path

RAY_ADDRESS_ENV = "RAY_ADDRESS"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
STORAGE_ENV = "CHESTXPERT_STORAGE"
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

# moto's server accepts any key; these stand-ins are not secrets and are only
# used for the loopback endpoint that `chestxpert up --s3` started itself.
LOCAL_S3_KEY = "chestxpert-local"


@dataclass(frozen=True)
class Endpoints:
    """Where the services are. No credential is held here, so printing it is safe.

    `ray_address` is a GCS address (`host:port`) or None to start Ray in-process;
    `storage_uri` is `file:///abs/path` or `s3://bucket/prefix`; `sources` says,
    per field, whether it came from a flag, the environment, the workspace or a default.
    """

    ray_address: str | None
    ray_dashboard_url: str | None
    ray_auth_token_path: str | None
    mlflow_tracking_uri: str
    storage_uri: str
    s3_endpoint_url: str | None
    workspace: Path
    local_s3: bool = False
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def storage_is_s3(self) -> bool:
        return self.storage_uri.startswith("s3://")


def _first(candidates: list[tuple[str, str | None]]) -> tuple[str | None, str]:
    for source, value in candidates:
        if value:
            return value, source
    return None, "unset"


def normalize_storage_uri(value: str) -> str:
    """The one spelling of a storage location: `s3://bucket/prefix` or `file:///absolute/path`.

    Used for every dataset, storage root and model URI, from a flag, a spec or the
    environment. A local path (or `file://` URI) is made absolute against the current
    directory, once, because trials run in other directories; symlinks are kept as given.
    Raises ValueError for a blank value, an `s3://` URI without a bucket, or another scheme.
    """
    if not value or not value.strip():
        raise ValueError("is blank; give a local folder or an s3://bucket/prefix URI")
    parsed = urlparse(value)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{value!r} names no bucket; expected s3://BUCKET/PREFIX")
        return value.rstrip("/")
    if parsed.scheme == "file":
        local = unquote(parsed.path)
    elif len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise ValueError(
            f"{value!r} has scheme {parsed.scheme!r}; expected a local folder, file:// or s3://"
        )
    else:
        local = os.path.expanduser(value)
    return Path(os.path.abspath(local)).as_uri()


def resolve(
    ray_address: str | None = None,
    mlflow_tracking_uri: str | None = None,
    storage: str | None = None,
    s3_endpoint_url: str | None = None,
    workspace: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    read_workspace_state: bool = True,
) -> Endpoints:
    """Resolve every endpoint: argument, then environment, then `chestxpert up` state, then default.

    Defaults are local and need no server: Ray started in-process, an MLflow
    SQLite store in the workspace, and a storage folder in the workspace.
    """
    env = os.environ if environ is None else environ
    ws = workspace_path(workspace)
    state = read_state(ws) if read_workspace_state else {}
    ray_state: dict[str, Any] = state.get("ray", {})
    mlflow_state: dict[str, Any] = state.get("mlflow", {})
    s3_state: dict[str, Any] = state.get("s3", {})

    address, address_src = _first(
        [
            ("flag", ray_address),
            ("env", env.get(RAY_ADDRESS_ENV)),
            ("workspace", ray_state.get("address")),
        ]
    )
    mlflow_uri, mlflow_src = _first(
        [
            ("flag", mlflow_tracking_uri),
            ("env", env.get(MLFLOW_URI_ENV)),
            ("workspace", mlflow_state.get("url")),
            ("default", f"sqlite:///{ws / 'mlflow.db'}"),
        ]
    )
    storage_value, storage_src = _first(
        [
            ("flag", storage),
            ("env", env.get(STORAGE_ENV)),
            ("workspace", state.get("storage_uri")),
            ("default", str(ws / "storage")),
        ]
    )
    endpoint, endpoint_src = _first(
        [("flag", s3_endpoint_url)]
        + [("env", env.get(name)) for name in S3_ENDPOINT_ENVS]
        + [("workspace", s3_state.get("url"))]
    )
    assert mlflow_uri is not None and storage_value is not None
    # The endpoint applies to every s3:// URI (datasets, storage), even when the
    # storage root itself is a local folder.
    try:
        storage_uri = normalize_storage_uri(storage_value)
    except ValueError as err:
        raise UserError(f"storage URI {err} (from the {storage_src})") from None

    # The workspace's Ray token belongs to the workspace's Ray; a cluster named
    # elsewhere brings its own token through Ray's own variables.
    token_path = ray_state.get("auth_token_path") if address_src == "workspace" else None
    dashboard = (
        ray_state.get("dashboard_url") if address and address == ray_state.get("address") else None
    )
    return Endpoints(
        ray_address=address,
        ray_dashboard_url=dashboard,
        ray_auth_token_path=token_path,
        mlflow_tracking_uri=mlflow_uri,
        storage_uri=storage_uri,
        s3_endpoint_url=endpoint,
        workspace=ws,
        local_s3=bool(endpoint and endpoint == s3_state.get("url")),
        sources={
            "ray_address": address_src,
            "mlflow_tracking_uri": mlflow_src,
            "storage": storage_src,
            "s3_endpoint_url": endpoint_src,
        },
    )


def worker_endpoints(environ: Mapping[str, str] | None = None) -> Endpoints:
    """Endpoints as a Ray trial or task sees them: only its environment, which the driver's
    runtime env filled in (`client_environment`). A `.chestxpert/` state file in whatever folder
    the worker runs in is never read: it may belong to another stack."""
    return resolve(environ=environ, read_workspace_state=False)


def aws_credentials(endpoints: Endpoints) -> tuple[str | None, str | None, str | None]:
    """Explicit S3 keys for our own loopback endpoint only; otherwise (None, None, None).

    Everywhere else boto3 and pyarrow walk the standard AWS chain themselves on
    each node (environment, ~/.aws, instance profile), so no key is copied into
    pickled filesystems or job configs. Never log the result.
    """
    if endpoints.local_s3 and not os.environ.get("AWS_ACCESS_KEY_ID"):
        return LOCAL_S3_KEY, LOCAL_S3_KEY, None
    return None, None, None


def client_environment(endpoints: Endpoints) -> dict[str, str]:
    """Environment variables a Ray client or worker needs to reach these services.

    Holds the Ray token *path* (not the token) and, for the local S3 endpoint,
    only its non-secret stand-in keys; real credentials stay in the caller's chain.
    """
    env: dict[str, str] = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    if endpoints.ray_auth_token_path:
        env["RAY_AUTH_TOKEN_PATH"] = endpoints.ray_auth_token_path
    if endpoints.s3_endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = endpoints.s3_endpoint_url
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoints.s3_endpoint_url
    if endpoints.local_s3 and not os.environ.get("AWS_ACCESS_KEY_ID"):
        env["AWS_ACCESS_KEY_ID"] = LOCAL_S3_KEY
        env["AWS_SECRET_ACCESS_KEY"] = LOCAL_S3_KEY
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return env


def apply_client_environment(endpoints: Endpoints) -> None:
    """Put `client_environment` into this process's environment.

    Call it before the first `import ray` (Ray reads its auth mode at import)
    and before boto3 or pyarrow open storage.
    """
    for key, value in client_environment(endpoints).items():
        if key == "RAY_AUTH_TOKEN_PATH" and os.environ.get("RAY_AUTH_TOKEN"):
            continue
        os.environ[key] = value


def prepare_ray_environment(workspace: str | os.PathLike[str] | None = None) -> None:
    """Set Ray's client auth variables for this process; call before anything imports Ray.

    Token auth is always on for us. Without a token of the user's own
    (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), the token `chestxpert up` wrote is
    used; else Ray's default ~/.ray/auth_token if present; else the workspace
    path where an in-process Ray will create one.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    ws = workspace_path(workspace)
    recorded = read_state(ws).get("ray", {}).get("auth_token_path")
    if recorded:
        os.environ["RAY_AUTH_TOKEN_PATH"] = recorded
    elif not (Path.home() / ".ray" / "auth_token").exists():
        # Ray treats a missing token file as fatal, so point at the workspace's only
        # when Ray's own default (~/.ray/auth_token, how cluster nodes get it) is absent.
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(ws / "ray_auth_token")


def storage_filesystem(endpoints: Endpoints, uri: str | None = None) -> tuple[Any, str]:
    """Return `(pyarrow filesystem, path)` for a storage URI (default: the storage root).

    For S3 the path is `bucket/prefix` without a scheme, as Ray Tune's
    `storage_filesystem` expects; S3-compatible endpoints are honoured.
    """
    import pyarrow.fs as pafs

    target = normalize_storage_uri(uri or endpoints.storage_uri)
    parsed = urlparse(target)
    if parsed.scheme == "s3":
        access, secret, token = aws_credentials(endpoints)
        options: dict[str, Any] = {}
        if endpoints.s3_endpoint_url:
            endpoint = urlparse(endpoints.s3_endpoint_url)
            options["endpoint_override"] = endpoint.netloc
            options["scheme"] = endpoint.scheme or "https"
        if access:
            options.update(access_key=access, secret_key=secret, session_token=token)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None:
            # S3-compatible stores ignore regions; real buckets answer 301 from the wrong one.
            region = (
                "us-east-1" if endpoints.s3_endpoint_url else pafs.resolve_s3_region(parsed.netloc)
            )
        fs = pafs.S3FileSystem(region=region, **options)
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), unquote(parsed.path)


def s3_client(endpoints: Endpoints) -> Any:
    """Return a boto3 S3 client for the resolved endpoint and the standard credential chain."""
    import boto3

    access, secret, token = aws_credentials(endpoints)
    return boto3.client(
        "s3",
        endpoint_url=endpoints.s3_endpoint_url,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        aws_session_token=token,
        region_name=os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
    )
